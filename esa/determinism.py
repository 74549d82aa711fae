"""Bit-reproducible kernels on CUDA: config ``deterministic: true``.

On the CPU every kernel ESA runs is deterministic already. On CUDA three kinds of kernel can
change the last bits of a score between two identical runs:

- cuBLAS's split reductions, whose order depends on its workspace: fixed by
  ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which must be set before cuBLAS's first call;
- SDPA's flash and memory-efficient attention backward (atomic adds into dQ): strict
  deterministic mode runs their deterministic paths and leaves cuDNN attention out;
- ``index_add`` / ``scatter_add`` (the embedding's backward): deterministic variants in that mode.

``torch.use_deterministic_algorithms(True)`` switches all of them and makes an op without a
deterministic CUDA kernel raise, instead of running nondeterministically. It costs speed, so it
is off by default: the scores' rankings do not depend on the last bits, the bit-exact restores
(index writes with unique indices) are deterministic either way.
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"


def use_deterministic_kernels(enabled: bool) -> None:
    """For the rest of this process, run only deterministic kernels (``enabled``), keeping a
    cuBLAS workspace setting the user already chose (``:16:8`` is the other valid one)."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
