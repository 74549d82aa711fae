"""Loading models from their sources (:mod:`esa.sources`), devices and dtypes.

De-quantising a GGUF takes seconds, so :func:`materialize` writes it once as a safetensors
checkpoint (a cached DAG output) that every later job loads in about a second.

A truncated or corrupt ``.gguf`` or ``*.safetensors`` file stops with one line naming the file
(:func:`check_weights`), before transformers would fail in its parser with a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from contextlib import contextmanager, nullcontext
from functools import cache
from pathlib import Path

import torch

from .errors import ESAError
from .io import disk_full_as_error, write_atomic
from .sources import ModelSource, resolve_source

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REF_FILE = "model.json"
ATTENTION = ("sdpa", "eager")  # what attn_implementation: auto tries, in this order


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


@contextmanager
def gguf_parsed_once():
    """Within it, each GGUF file is parsed once and each of gguf's tensor-name tables built once.

    transformers parses the whole file (metadata, vocabulary, tensor table) in each of its three
    loads of one model, config, tokenizer and weights (3.9 s each for the bundled SmolLM2), and
    builds gguf's tensor-name table of the architecture for each of its ~400 modules (5.3 s in
    all); both are pure functions of their arguments, read-only afterwards. Measured on the
    bundled model: tokenizer and model 15.9 -> 5.4 s, the same bits. A nested use shares the
    outer one's readers."""
    import gguf

    if getattr(gguf.GGUFReader, "parsed_once", False):
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    reader.parsed_once = True
    gguf.GGUFReader, gguf.get_tensor_name_map = reader, cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def _from_pretrained(cls, source: ModelSource, what: str, **kwargs):
    path, extra = source.from_pretrained_args()
    try:
        with gguf_parsed_once() if source.gguf_file else nullcontext():
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


def causal_lm_class(model_config) -> type:
    """The transformers ``*ForCausalLM`` class that ``AutoModelForCausalLM`` builds for a config."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(model_config)]
    except KeyError:
        raise ESAError(f"{type(model_config).__name__} has no causal LM class in transformers") from None


def resolve_attention(model_class: type, requested: str) -> str:
    """The attention implementation to load ``model_class`` with.

    ``auto`` is the first of ``ATTENTION`` (sdpa, eager) the class supports (transformers'
    ``_supports_sdpa``; every class has eager); an explicit choice the class does not support
    is an error naming the class and the allowed choices.
    """
    allowed = tuple(impl for impl in ATTENTION if impl != "sdpa" or model_class._supports_sdpa is True)
    if requested == "auto":
        return allowed[0]
    if requested not in allowed:
        raise ESAError(f"attn_implementation {requested!r} is not supported by {model_class.__name__}; "
                       f"allowed: {', '.join(allowed)}, auto")
    return requested


def attention_of(model) -> str:
    """The attention implementation a loaded model runs (what its step's manifest records)."""
    return model.config._attn_implementation


def _not_valid(path: Path, kind: str, reason: str) -> ESAError:
    return ESAError(f"model file {path} is not a valid {kind} file (truncated or corrupt: {reason})")


def _check_gguf(path: Path) -> None:
    """Parse the header and tensor table (no tensor data) with transformers' own GGUF reader and
    check that the file holds every tensor's bytes."""
    from transformers.integrations.gguf.reader import GgufHeader

    size = path.stat().st_size
    try:
        header = GgufHeader.from_file(str(path))
    except struct.error:
        raise _not_valid(path, "GGUF", f"the header runs past the end of the file at {size} bytes") from None
    except (ValueError, KeyError, UnicodeDecodeError) as err:
        raise _not_valid(path, "GGUF", str(err) or type(err).__name__) from None
    end = header.data_start + max((t.offset + t.nbytes for t in header.tensors), default=0)
    if end > size:
        raise _not_valid(path, "GGUF", f"{size} bytes, its tensors need {end}")


def _check_safetensors(path: Path) -> None:
    """Parse the header: safetensors checks that its tensors cover the file exactly."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as err:
        raise _not_valid(path, "safetensors", str(err)) from None


def check_weights(source: ModelSource) -> None:
    """Stop with one line on a truncated or corrupt local weight file: the ``.gguf``, or every
    ``*.safetensors`` of a checkpoint directory (headers only: milliseconds). A hub checkpoint
    is not on disk yet and is left to transformers."""
    if source.kind == "gguf":
        _check_gguf(Path(source.path) / source.gguf_file)
    elif source.kind == "dir":
        for path in sorted(Path(source.path).glob("*.safetensors")):
            _check_safetensors(path)


def context_length(model_config) -> int | None:
    """The longest sequence the model's position embeddings cover, where it says."""
    text_config = getattr(model_config, "get_text_config", lambda: model_config)()
    return getattr(text_config, "max_position_embeddings", None)


def materialize(source: str, out_dir: str | Path, revision: str | None = None) -> dict:
    """Write ``out_dir/model.json`` pointing at a fast-loading checkpoint of ``source``.

    A GGUF is de-quantised once and saved as fp32 safetensors beside it, in ``checkpoint/``,
    referenced by that relative name so the results directory can be moved; a local directory
    (by its absolute path) or hub id is referenced as it is (copying an 8B checkpoint would
    gain nothing), a hub id with its ``revision`` (the commit :mod:`esa.revisions` pinned), which
    every later load of the model then takes. Atomic: the checkpoint is written in full to a temporary directory beside
    it and renamed into place, and ``model.json``, written last, appears whole or not at all.
    """
    out_dir = Path(out_dir)
    resolved = resolve_source(source, revision)
    ref = {"source": source, "kind": resolved.kind, "path": resolved.path}
    if resolved.revision:
        ref["revision"] = resolved.revision
    check_weights(resolved)  # fail here, not in every later job, when a file is broken
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

    with gguf_parsed_once():
        tokenizer = load_tokenizer(source)
        model = _from_pretrained(AutoModelForCausalLM, source, "model", dtype=torch.float32)
    # named by process (not mkdtemp, whose 0700 mode the checkpoint would keep)
    tmp, old = (weights.with_name(f".{weights.name}.{os.getpid()}.{part}") for part in ("tmp", "old"))
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        with disk_full_as_error(weights):
            tmp.mkdir(parents=True)
            # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain
            # tensors after de-quantisation, so write them and the config directly
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            # safetensors renames its own 0600 temporary into place; the config got the umask's mode
            os.chmod(tmp / "model.safetensors", (tmp / "config.json").stat().st_mode & 0o777)
            if weights.exists():  # a directory cannot be renamed over a non-empty one
                os.replace(weights, old)
            os.replace(tmp, weights)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def source_from_ref(ref_path: str | Path) -> ModelSource:
    """The checkpoint a ``model.json`` written by :func:`materialize` points at.

    A relative path is relative to the directory of ``model.json``; a hub id stays a hub id, at
    its pinned revision.
    """
    ref = json.loads(Path(ref_path).read_text())
    if ref["kind"] == "hub":
        return ModelSource("hub", ref["path"], revision=ref.get("revision"))
    return ModelSource(ref["kind"], str((Path(ref_path).parent / ref["path"]).resolve()))


def load_model(source: ModelSource, device: str = "auto", dtype: str = "fp32",
               attn_implementation: str = "auto", device_map: str | None = None):
    """Load a causal LM in eval mode on ``device`` with parameters in ``dtype``, with the attention
    :func:`resolve_attention` picks for ``attn_implementation`` (:func:`attention_of` tells it).

    ``device_map="auto"`` shards a model too large for one GPU over every GPU of the node
    (accelerate's placement); inputs then go to the embedding's device.
    """
    from transformers import AutoModelForCausalLM

    torch_device = resolve_device(device)
    check_weights(source)
    attention = resolve_attention(causal_lm_class(load_config(source)), attn_implementation)
    placement = {"device_map": device_map} if device_map else {}
    model = _from_pretrained(AutoModelForCausalLM, source, "model", dtype=resolve_dtype(dtype),
                             attn_implementation=attention, **placement)
    log.info("loaded %s (%s) on %s as %s, attention=%s", source.path, source.kind,
             device_map or torch_device, dtype, attention)
    return (model if device_map else model.to(torch_device)).eval()
