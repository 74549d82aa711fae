"""The bundled SmolLM2-135M (de-quantised GGUF, fp32, on the CPU) and the first evaluation
windows of ``builtin:pydoc``, as the benchmarks that time one evaluation load them."""

from __future__ import annotations

import torch

from esa.data import load_documents, make_windows
from esa.models import load_model, load_tokenizer, resolve_source


def bundled_model_and_windows(windows: int, seq_len: int):
    """``(model, the first `windows` evaluation windows of `seq_len` tokens, a LongTensor)``."""
    source = resolve_source("builtin:smollm2-135m")
    model = load_model(source, "cpu", "fp32", "sdpa")
    _, docs = load_documents("builtin:pydoc")
    return model, torch.from_numpy(make_windows(load_tokenizer(source), docs, seq_len)[:windows]).long()
