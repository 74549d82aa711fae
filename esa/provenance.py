"""Code versions for Snakemake: a hash of exactly the `esa` code a workflow step runs.

Snakemake reruns a job when its params change but does not look into imported packages. Each
rule therefore carries ``code_version(step)`` as a param: a hash of the definitions the step
reaches, at the grain of a definition, not of a module. From ``step_<name>`` it follows every
name the code uses: a function, class or assignment of the same module, an `esa` name imported
(``from .x import f`` reaches ``f`` in ``esa.x``, and what ``f`` uses), an attribute of an
imported `esa` module (``x.f``), and a module used as a whole (passed around, not only as
``x.attr``) with all its definitions. A module reached at all adds its statements that define
nothing (a registration call, an ``if`` at module level). So adding a constant to
``esa/names.py`` reruns only the steps that come to use it, and editing one helper of
``esa/layout.py`` reruns only the steps that call it.

The hash is taken over the syntax tree with docstrings left out (comments never reach it),
so fixing a docstring or a comment reruns nothing. Everything is read from the source files
with :mod:`ast`, nothing is imported: building the DAG never loads torch.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .metrics import SCORE_JOBS, implementation_roots
from .step_table import STEPS

PACKAGE = "esa"
ROOT = Path(__file__).resolve().parent
WHOLE = "*"  # a module used as a whole: every definition of it


def module_path(module: str) -> Path | None:
    """The source file of the `esa` module ``module`` (a package's ``__init__.py``), or None."""
    base = ROOT.joinpath(*module.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def resolve_relative(module: str, level: int, name: str | None) -> str:
    """The absolute module of ``from <level dots><name> import ...`` written in ``module``.

    Level 1 is the package holding ``module`` (``module`` itself for a package's
    ``__init__``), each further dot one package up, as the import system resolves it.
    """
    parts = module.split(".")
    path = module_path(module)
    package = parts if path is not None and path.name == "__init__.py" else parts[:-1]
    if level - 1 > len(package) - 1:
        raise ImportError(f"relative import beyond the top-level package in {module}")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


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


def _esa_bindings(node: ast.AST, module: str) -> dict[str, tuple[str, str]]:
    """``{bound name: (esa module, name in it or WHOLE)}`` for every `esa` import inside ``node``.

    ``from .x import f`` binds f to (esa.x, f), or to (esa.x.f, WHOLE) where esa.x.f is a module;
    ``from . import x`` and ``import esa.x as x`` bind x to (esa.x, WHOLE).
    """
    bound = {}
    for item in ast.walk(node):
        if isinstance(item, ast.ImportFrom):
            base = resolve_relative(module, item.level, item.module) if item.level else (item.module or "")
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in item.names:
                candidate = f"{base}.{alias.name}"
                bound[alias.asname or alias.name] = ((candidate, WHOLE) if module_path(candidate)
                                                     else (base, alias.name))
        elif isinstance(item, ast.Import):
            for alias in item.names:
                if alias.name.startswith(PACKAGE + ".") and alias.asname:
                    bound[alias.asname] = (alias.name, WHOLE)
    return bound


@dataclass
class _Module:
    definitions: dict[str, list[ast.AST]] = field(default_factory=dict)
    always: list[ast.AST] = field(default_factory=list)  # statements that define nothing
    imports: dict[str, tuple[str, str]] = field(default_factory=dict)


def _bound_names(statement: ast.AST) -> list[str]:
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [statement.name]
    if isinstance(statement, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
        return [leaf.id for target in targets for leaf in ast.walk(target) if isinstance(leaf, ast.Name)]
    return []


@lru_cache(maxsize=None)
def _index(module: str) -> _Module:
    """The top-level definitions, defining-nothing statements and `esa` imports of ``module``."""
    tree = ast.parse(module_path(module).read_text(encoding="utf-8"))
    index = _Module(imports=_esa_bindings(ast.Module(body=[s for s in tree.body if isinstance(
        s, (ast.Import, ast.ImportFrom))], type_ignores=[]), module))
    for position, statement in enumerate(tree.body):
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            continue
        if position == 0 and isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # the module docstring
        names = _bound_names(statement)
        for name in names:
            index.definitions.setdefault(name, []).append(statement)
        if not names:
            index.always.append(statement)
    return index


def _references(node: ast.AST, module: str) -> set[tuple[str, str]]:
    """The (module, name) pairs ``node`` of ``module`` uses: its own module's definitions, the
    `esa` names it imports at the top or inside itself, and attributes of `esa` modules."""
    index = _index(module)
    local = _esa_bindings(node, module)  # imports inside a function body (kept lazy)
    bindings = {**index.imports, **local}
    found, attribute_bases = set(), set()
    for leaf in ast.walk(node):
        if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name):
            target = bindings.get(leaf.value.id)
            if target and target[1] == WHOLE:
                found.add((target[0], leaf.attr))
                attribute_bases.add(id(leaf.value))
    for leaf in ast.walk(node):
        if not isinstance(leaf, ast.Name):
            continue
        if leaf.id in bindings:
            if id(leaf) not in attribute_bases:
                found.add(bindings[leaf.id])
        elif leaf.id in index.definitions:
            found.add((module, leaf.id))
    return found


def reached(roots: set[tuple[str, str]]) -> dict[tuple[str, str], list[ast.AST]]:
    """Every definition reachable from ``roots`` ((module, name) pairs), with its nodes; a
    module's defining-nothing statements appear under (module, "")."""
    pending, seen, nodes = list(roots), set(), {}
    while pending:
        key = pending.pop()
        if key in seen:
            continue
        seen.add(key)
        module, name = key
        if module_path(module) is None:
            continue
        index = _index(module)
        if (module, "") not in nodes:
            nodes[(module, "")] = index.always
            pending.extend(ref for statement in index.always for ref in _references(statement, module))
        if name == WHOLE:
            targets = [(module, n) for n in index.definitions]
            pending.extend(targets)
            continue
        if name in index.definitions:
            nodes[key] = index.definitions[name]
            pending.extend(ref for statement in index.definitions[name] for ref in _references(statement, module))
        elif name in index.imports:  # a name the module re-exports
            pending.append(index.imports[name])
    return nodes


def step_definitions(step: str, extra: tuple[tuple[str, str], ...] = ()) -> dict[tuple[str, str], list[ast.AST]]:
    """The definitions the step reaches from ``step_<step>`` and the ``extra`` roots."""
    return reached({(STEPS[step].module, f"step_{step}"), *extra})


@lru_cache(maxsize=None)
def code_version(step: str, extra: tuple[tuple[str, str], ...] = ()) -> str:
    """Short hash of the code behind the workflow step ``step_<step>`` (and the ``extra``
    (module, name) roots: code a step loads by name), docstrings and comments excluded.

    Every Snakemake run (a dry run too) needs every step's version, ~1.2 s of syntax-tree walks
    on 2 cores; they are a function of the package's source files and the Python version alone,
    so they are kept in a cache file named by a digest of both (:func:`_cached_versions`)."""
    key = json.dumps([STEPS[step].module, step, extra])
    cache = _cached_versions()
    if key not in cache.versions:
        digest = hashlib.sha256()
        for (module, name), statements in sorted(step_definitions(step, extra).items()):
            digest.update(f"{module}:{name}\n".encode())
            for statement in statements:
                digest.update(_dump(statement).encode())
        cache.versions[key] = digest.hexdigest()[:16]
        cache.save()
    return cache.versions[key]


CACHE_FILES_KEPT = 64  # the newest; an edit of the package names a new file


@dataclass
class _VersionCache:
    path: Path | None
    versions: dict[str, str]

    def save(self) -> None:
        """Write the cache (atomically); a cache directory that cannot be written is no cache."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            temporary.write_text(json.dumps(self.versions, sort_keys=True))
            os.replace(temporary, self.path)
            for old in sorted(self.path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime)[:-CACHE_FILES_KEPT]:
                old.unlink(missing_ok=True)
        except OSError:
            self.path = None


def _cached_versions() -> _VersionCache:
    """The cached versions of the package as it is on disk now: a file under
    ``$XDG_CACHE_HOME/esa/code-versions`` (default ``~/.cache``) named by the SHA-256 of the
    Python version and every ``.py`` file of the package (path and bytes), read once per digest;
    ``ESA_CODE_VERSION_CACHE=0`` turns it off."""
    digest = hashlib.sha256(f"{sys.version_info[:2]}\n".encode())
    for path in sorted(ROOT.rglob("*.py")):
        digest.update(f"{path.relative_to(ROOT).as_posix()}\n".encode())
        digest.update(path.read_bytes())
    return _read_cache(digest.hexdigest())


@lru_cache(maxsize=None)
def _read_cache(digest: str) -> _VersionCache:
    if os.environ.get("ESA_CODE_VERSION_CACHE") == "0":
        return _VersionCache(None, {})
    home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(home) / "esa" / "code-versions" / f"{digest}.json"
    try:
        versions = json.loads(path.read_text())
    except (OSError, ValueError):
        versions = {}
    return _VersionCache(path, versions if isinstance(versions, dict) else {})


@lru_cache(maxsize=None)
def _dump(statement: ast.AST) -> str:
    return ast.dump(_strip_docstrings(statement))


def rule_versions() -> dict[str, tuple[str, tuple[tuple[str, str], ...]]]:
    """Each distinct code version the rules carry, by name: a step's, and one per scores job
    (``scores_<job>``: the scores step with its metrics' modules as extra roots, which the step
    loads by name from the registry)."""
    versions = {name: (name, ()) for name in STEPS if name != "scores"}
    versions.update({f"scores_{job}": ("scores", implementation_roots(metrics)) for job, metrics in SCORE_JOBS.items()})
    return dict(sorted(versions.items()))


def version_table(versions: dict[str, tuple[str, tuple[tuple[str, str], ...]]]) -> str:
    """The README's table (Markdown): for each `esa` module, the rules' code versions
    (:func:`rule_versions`) its definitions enter, and how many of its definitions each reaches
    at most."""
    entered: dict[str, dict[str, int]] = {}
    for label, (step, extra) in versions.items():
        for module, name in step_definitions(step, extra):
            if name:
                entered.setdefault(module, {}).setdefault(label, 0)
                entered[module][label] += 1
    rows = ["| module | definitions | code versions it enters |", "|---|---|---|"]
    for module in sorted(entered):
        total = len(_index(module).definitions)
        reach = max(entered[module].values())
        rows.append(f"| `{module}` | {reach} of {total} at most | {', '.join(sorted(entered[module]))} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(version_table(rule_versions()), end="")
