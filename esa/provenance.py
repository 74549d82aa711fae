"""Code versions for Snakemake: a hash of exactly the `esa` code a workflow step runs.

Snakemake reruns a job when its params change but does not look into imported packages. Each
rule therefore carries ``code_version(step)`` as a param: a hash of the step function, the
helpers of its own module it calls, and every `esa` module it reaches through imports.
Editing ``esa/perturb.py`` reruns the perturb jobs and nothing upstream of them.

The hash is taken over the syntax tree with docstrings left out (comments never reach it),
so fixing a docstring or a comment reruns nothing. Everything is read from the source files
with :mod:`ast`, nothing is imported: building the DAG never loads torch.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "esa"
ROOT = Path(__file__).resolve().parent
STEP_MODULES = ("esa.steps", "esa.model_steps")  # the modules that define ``step_<name>``


def _path(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")


@lru_cache(maxsize=None)
def _tree(module: str) -> ast.Module:
    return ast.parse(_path(module).read_text(encoding="utf-8"))


def _strip_docstrings(node: ast.AST) -> ast.AST:
    """A copy of ``node`` without the docstrings of its module, classes and functions."""
    node = ast.parse(ast.unparse(node))
    for item in ast.walk(node):
        body = getattr(item, "body", None)
        if (isinstance(item, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            item.body = body[1:] or [ast.Pass()]
    return node


def _esa_imports(node: ast.AST, module: str) -> dict[str, str]:
    """``{bound name: esa module}`` for every `esa` import inside ``node`` (any depth).

    ``from .x import f`` binds f to esa.x; ``from . import x`` and ``import esa.x`` bind x.
    """
    package = module.rsplit(".", 1)[0]
    bound = {}
    for item in ast.walk(node):
        if isinstance(item, ast.ImportFrom):
            base = item.module or ""
            if item.level:
                base = f"{package}.{base}" if base else package
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in item.names:
                candidate = f"{base}.{alias.name}"
                bound[alias.asname or alias.name] = candidate if _path(candidate).exists() else base
        elif isinstance(item, ast.Import):
            for alias in item.names:
                if alias.name.startswith(PACKAGE + "."):
                    bound[alias.asname or alias.name] = alias.name
    return bound


@lru_cache(maxsize=None)
def _module_imports(module: str) -> dict[str, str]:
    """:func:`_esa_imports` of a whole module: once per module, whatever the steps that reach it."""
    return _esa_imports(_tree(module), module)


def _module_closure(modules: set[str]) -> set[str]:
    """``modules`` and every `esa` module they import, transitively."""
    pending, seen = list(modules), set(modules)
    while pending:
        module = pending.pop()
        for found in _module_imports(module).values():
            if found not in seen and _path(found).exists():
                seen.add(found)
                pending.append(found)
    return seen


def _step_closure(step: str) -> tuple[list[ast.AST], set[str]]:
    """The definitions of the step's own module it runs, and the `esa` modules it reaches."""
    name = f"step_{step}"
    for module in STEP_MODULES:
        tree = _tree(module)
        definitions = {}
        for item in tree.body:
            if isinstance(item, (ast.FunctionDef, ast.ClassDef)):
                definitions[item.name] = item
            elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                for target in targets:
                    for leaf in ast.walk(target):
                        if isinstance(leaf, ast.Name):
                            definitions[leaf.id] = item
        if name in definitions:
            break
    else:
        raise KeyError(f"no workflow step {name} in {STEP_MODULES}")
    imported = _module_imports(module)
    used, modules, pending = [], set(), [definitions[name]]
    while pending:
        node = pending.pop()
        if node in used:
            continue
        used.append(node)
        local = _esa_imports(node, module)  # imports inside a function body (kept lazy)
        modules.update(local.values())
        for leaf in ast.walk(node):
            if isinstance(leaf, ast.Name):
                if leaf.id in imported:
                    modules.add(imported[leaf.id])
                elif leaf.id in definitions and leaf.id not in local:
                    pending.append(definitions[leaf.id])
    return used, _module_closure(modules)


@lru_cache(maxsize=None)
def code_version(step: str) -> str:
    """Short hash of the code behind the workflow step ``step_<step>`` (docstrings and
    comments excluded)."""
    definitions, modules = _step_closure(step)
    digest = hashlib.sha256()
    for dump in sorted(ast.dump(_strip_docstrings(node)) for node in definitions):
        digest.update(dump.encode())
    for module in sorted(modules):
        digest.update(module.encode() + _module_dump(module).encode())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=None)
def _module_dump(module: str) -> str:
    """A module's syntax tree without docstrings, as text: once per module, whatever the steps
    that reach it (most steps share most modules)."""
    return ast.dump(_strip_docstrings(_tree(module)))
