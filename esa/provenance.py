"""Code versions for Snakemake: a hash of exactly the `esa` code a workflow step runs.

Snakemake reruns a job when its params change but does not look into imported packages. Each
rule therefore carries ``code_version(step)`` as a param: a hash of the step function, the
step-module helpers it calls, and every `esa` module it reaches through imports. Editing
``esa/perturb.py`` reruns the perturb jobs and nothing upstream of them.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import sys
import textwrap
import types
from functools import lru_cache

PACKAGE = "esa"


def _imports(source: str) -> set[str]:
    """Names of the `esa` modules a piece of source imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1:
                names = [f"{PACKAGE}.{base}"] if base else [f"{PACKAGE}.{a.name}" for a in node.names]
            elif base == PACKAGE or base.startswith(PACKAGE + "."):
                names = [base] if base != PACKAGE else [f"{PACKAGE}.{a.name}" for a in node.names]
            else:
                continue
            found.update(n for n in names if n in sys.modules or _importable(n))
    return found


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _referenced(function, namespace: dict, seen_functions: set, modules: set) -> None:
    """Collect the `esa` modules and same-module helpers a function refers to."""
    code_objects = [function.__code__]
    while code_objects:
        code = code_objects.pop()
        code_objects += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        for name in code.co_names:
            obj = namespace.get(name)
            if isinstance(obj, types.ModuleType) and obj.__name__.startswith(PACKAGE + "."):
                modules.add(obj.__name__)
            elif callable(obj) and getattr(obj, "__module__", "").startswith(PACKAGE + "."):
                if obj.__module__ == function.__module__ and inspect.isfunction(obj) and obj not in seen_functions:
                    seen_functions.add(obj)
                    _referenced(obj, namespace, seen_functions, modules)
                elif obj.__module__ != function.__module__:
                    modules.add(obj.__module__)


def _closure(step: str) -> tuple[set, set[str]]:
    """The functions of ``esa.steps`` and the `esa` modules that ``step_<step>`` runs."""
    from . import steps

    function = getattr(steps, f"step_{step}")
    functions, modules = {function}, set()
    _referenced(function, vars(steps), functions, modules)
    for f in functions:  # imports inside a function body (kept lazy for start-up time)
        modules |= _imports(textwrap.dedent(inspect.getsource(f)))
    pending = list(modules)
    while pending:
        for name in _imports(inspect.getsource(sys.modules[pending.pop()])):
            if name not in modules:
                modules.add(name)
                pending.append(name)
    return functions, modules


@lru_cache(maxsize=None)
def code_version(step: str) -> str:
    """Short hash of the code behind ``esa.steps.step_<step>``."""
    functions, modules = _closure(step)
    digest = hashlib.sha256()
    for source in sorted(inspect.getsource(f) for f in functions):
        digest.update(source.encode())
    for name in sorted(modules):
        digest.update(name.encode() + inspect.getsource(sys.modules[name]).encode())
    return digest.hexdigest()[:16]
