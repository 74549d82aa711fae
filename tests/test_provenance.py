"""Code versions at the grain of a definition (esa.provenance): an edit reruns the steps whose
code it changes and no other, through relative imports of any level."""

import json
import shutil
import textwrap

import pytest
from conftest import REPO

from esa import provenance
from esa.step_table import STEPS as STEP_TABLE
from esa.step_table import Step

STEPS = sorted(STEP_TABLE)


def _clear_caches():
    for cached in (provenance._index, provenance.code_version, provenance._dump):
        cached.cache_clear()


@pytest.fixture
def package(tmp_path, monkeypatch):
    """``write(files)``: an `esa` package of ``files`` ({relative path: source}) that
    provenance reads instead of the real one."""
    root = tmp_path / "esa"

    def write(files: dict[str, str]) -> None:
        for name, source in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(textwrap.dedent(source))
        _clear_caches()

    monkeypatch.setattr(provenance, "ROOT", root)
    monkeypatch.setattr(provenance, "STEPS", {name: Step(name, torch=False) for name in ("s", "t")})
    write({"__init__.py": ""})
    yield write
    _clear_caches()


@pytest.fixture
def esa_copy(tmp_path, monkeypatch):
    """A copy of the real package that provenance reads: edit it, compare versions."""
    root = tmp_path / "esa"
    shutil.copytree(REPO / "esa", root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "ROOT", root)
    _clear_caches()
    yield root
    _clear_caches()


def _versions() -> dict[str, str]:
    _clear_caches()
    return {step: provenance.code_version(step) for step in STEPS}


def _moved(before: dict[str, str]) -> list[str]:
    after = _versions()
    return sorted(step for step in STEPS if after[step] != before[step])


def test_relative_imports_resolve_as_python_does(package):
    package({"sub/__init__.py": "", "sub/mod.py": "", "x.py": "", "steps.py": ""})
    assert provenance.resolve_relative("esa.sub.mod", 1, "y") == "esa.sub.y"
    assert provenance.resolve_relative("esa.sub.mod", 2, "x") == "esa.x"
    assert provenance.resolve_relative("esa.sub", 1, "mod") == "esa.sub.mod"  # a package's __init__
    assert provenance.resolve_relative("esa.sub", 2, None) == "esa"
    with pytest.raises(ImportError):
        provenance.resolve_relative("esa.x", 2, "y")


def test_a_level_2_import_enters_the_version(package):
    """Before: ``from ..x import f`` in esa.sub.mod was resolved as esa.sub.x, which does not
    exist, and f fell out of the hash: an edit of f reused stale results."""
    package({
        "x.py": "def f():\n    return 1\n",
        "sub/__init__.py": "",
        "sub/mod.py": "from ..x import f\n\ndef g():\n    return f()\n",
        "steps.py": "from .sub.mod import g\n\ndef step_s(spec):\n    return g()\n",
        "model_steps.py": "",
    })
    assert set(provenance.step_definitions("s")) >= {("esa.x", "f"), ("esa.sub.mod", "g")}
    before = provenance.code_version("s")
    package({"x.py": "def f():\n    return 2\n"})
    assert provenance.code_version("s") != before


def test_only_what_a_step_uses_enters_its_version(package):
    package({
        "names.py": "A = 1\nB = 2\n",
        "helpers.py": "from .names import A\n\ndef used():\n    return A\n\ndef unused():\n    return 0\n",
        "steps.py": textwrap.dedent("""\
            from . import helpers
            from .names import B

            def step_s(spec):
                return helpers.used()

            def step_t(spec):
                return B
            """),
        "model_steps.py": "",
    })
    assert set(provenance.step_definitions("s")) == {
        ("esa.steps", "step_s"), ("esa.helpers", "used"), ("esa.names", "A"),
        ("esa.steps", ""), ("esa.helpers", ""), ("esa.names", "")}
    s, t = provenance.code_version("s"), provenance.code_version("t")
    package({"helpers.py": "from .names import A\n\ndef used():\n    return A\n\ndef unused():\n    return 1\n",
             "names.py": "A = 1\nB = 3\nC = 4\n"})
    assert (provenance.code_version("s"), provenance.code_version("t") != t) == (s, True)
    package({"names.py": "A = 5\nB = 3\nC = 4\n"})
    assert provenance.code_version("s") != s


def test_a_new_constant_in_names_moves_no_version(esa_copy):
    """Before: one appended line in esa/names.py moved 16 of the 19 steps' versions."""
    before = _versions()
    with open(esa_copy / "names.py", "a") as names:
        names.write('NEW_KIND = ("a", "b")\n')
    assert _moved(before) == []


def test_a_docstring_or_comment_moves_no_version(esa_copy):
    before = _versions()
    scores = esa_copy / "scores.py"
    scores.write_text(scores.read_text().replace('"""', '"""An edited docstring. ', 1) + "# a comment\n")
    assert _moved(before) == []


def test_editing_a_helper_moves_only_the_steps_that_call_it(esa_copy):
    """Before: any edit of esa/config.py moved every step reaching esa.manifest, and any edit of
    esa/layout.py every perturb job."""
    before = _versions()
    config = esa_copy / "config.py"
    text = config.read_text()
    config.write_text(text + "\n\ndef a_new_helper():\n    return 0\n")
    assert _moved(before) == []
    old = "return hashlib.sha256(json.dumps(config, sort_keys=True, default=str)"
    assert old in text
    config.write_text(text.replace(old, "return hashlib.sha256(json.dumps(config, sort_keys=True, default=repr)"))
    users = {step for step in STEPS if ("esa.config", "config_hash") in provenance.step_definitions(step)}
    assert _moved(before) == sorted(users) and users and not users & {"topk", "model", "data"}


def test_the_readme_table_is_the_generated_one():
    readme = (REPO / "README.md").read_text()
    copy = readme.split("<!-- code-versions:start -->\n", 1)[1].split("<!-- code-versions:end -->", 1)[0]
    assert copy == provenance.version_table(provenance.rule_versions())


def test_code_versions_are_cached_by_the_sources_digest(esa_copy, tmp_path, monkeypatch):
    """A second run reads every version from the cache file named by the package's digest
    (no syntax-tree walk); an edit names another file and is computed afresh; the cache off
    (ESA_CODE_VERSION_CACHE=0) or unwritable computes them all the same."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    provenance._read_cache.cache_clear()
    first = _versions()
    files = list((tmp_path / "cache" / "esa" / "code-versions").glob("*.json"))
    assert len(files) == 1 and set(json.loads(files[0].read_text()).values()) == set(first.values())

    provenance._read_cache.cache_clear()  # a new process: the file alone
    monkeypatch.setattr(provenance, "step_definitions", lambda *a: pytest.fail("walked a cached version"))
    assert _versions() == first
    monkeypatch.undo()
    monkeypatch.setattr(provenance, "ROOT", esa_copy)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    stability = esa_copy / "stability.py"
    stability.write_text(stability.read_text().replace("def seed_stability(", "def seed_stability(*_unused, "))
    edited = _versions()
    assert sorted(s for s in STEPS if edited[s] != first[s]) == ["stability"]
    assert len(list((tmp_path / "cache" / "esa" / "code-versions").glob("*.json"))) == 2

    for variable, value in (("ESA_CODE_VERSION_CACHE", "0"), ("XDG_CACHE_HOME", "/proc/esa-no-cache")):
        monkeypatch.setenv(variable, value)
        provenance._read_cache.cache_clear()
        assert _versions() == edited
    provenance._read_cache.cache_clear()
