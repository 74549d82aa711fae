"""Mixed precision: the decoder's matmuls in bf16 or fp16, the weights and the loss as stored.

``mixed_precision`` (accelerate's names): ``no``, ``bf16``, ``fp16``, or ``auto``.

- The weights stay in ``dtype`` (fp32: the master copy), so a perturbation and its restore are
  bit-exact and every score is of the stored weights (``grad`` of an fp32 weight is fp32).
- The decoder runs under ``torch.autocast(device, bf16 | fp16)``: matmuls and attention in the
  low precision with fp32 accumulation, norms, softmax and the residual stream in fp32 (autocast's
  own op lists). Every pass reaches the model through :func:`esa.evaluation.decoder_hidden`, which
  enters :func:`autocast`, so the gradient metrics, Hutchinson's double backward, the activation
  trace and every evaluation run the same arithmetic.
- The LM head and the loss run outside it: fp32 logits from the (fp32) final hidden states, the
  loss in float64. Measured on the bundled model (4 x 256 tokens, 2 threads): a bf16 head saves
  4% of a bf16 forward and moves the summed NLL 5x further from fp32 (+2.0e-4 relative against
  -4.4e-5 with an fp32 head), and its bf16 logits would set a KL floor far above a small edit's.
- fp16 keeps its loss scaling (``esa.metrics.gradient_pass``): fp16 activation gradients
  underflow as fp16 weights' gradients do.

``auto`` is ``bf16`` where the device multiplies it fast, else ``no``: a CUDA device of compute
capability >= 8.0, a CPU with AMX-BF16 or AVX512-BF16. It is resolved torch-free where the DAG is
built (the resolution enters the keys, as ``device: auto``'s does; ``esa.devices``). With
weights already in bf16 or fp16 there is nothing to mix: ``auto`` is ``no``, and an explicit
``bf16``/``fp16`` is an error.
"""

from __future__ import annotations

from contextlib import nullcontext

from .devices import cpu_flags, cuda_compute_capability
from .errors import ESAError

NO, BF16, FP16, AUTO = "no", "bf16", "fp16", "auto"
MIXED_PRECISION = (AUTO, NO, BF16, FP16)
FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
FAST_BF16_CUDA = (8, 0)  # Ampere: bf16 tensor cores
PRECISION_VARIABLE = "ESA_MIXED_PRECISION"  # the head's resolution, handed to the jobs a cluster starts
_ATTRIBUTE = "_esa_mixed_precision"  # on the loaded model: the precision its passes run in


def fast_bf16(device: str) -> bool:
    """Whether ``device`` (``cpu``, ``cuda``, ``cuda:N``; ``auto`` already resolved) multiplies
    bf16 fast."""
    if device.startswith("cuda"):
        capability = cuda_compute_capability(int(device.partition(":")[2] or 0))
        return capability is not None and capability >= FAST_BF16_CUDA
    return any(flag in cpu_flags() for flag in FAST_BF16_CPU_FLAGS)


def resolve_mixed_precision(setting: str | bool, device: str, dtype: str) -> str:
    """``no``, ``bf16`` or ``fp16``: ``setting`` with ``auto`` decided for ``device`` (resolved)
    and ``dtype`` (the weights'). YAML reads an unquoted ``no`` as false; it means ``no``."""
    setting = NO if setting is False else setting
    if setting not in MIXED_PRECISION:
        raise ESAError(f"unknown mixed_precision {setting!r}; allowed: {', '.join(MIXED_PRECISION)}")
    if setting == AUTO:
        return BF16 if dtype == "fp32" and fast_bf16(device) else NO
    if setting != NO and dtype != "fp32":
        raise ESAError(f"mixed_precision {setting} needs dtype fp32 (the master weights it mixes with); "
                       f"dtype is {dtype}: use mixed_precision no, or dtype fp32")
    return setting


def use_mixed_precision(model, mode: str):
    """Run ``model``'s passes in ``mode`` (resolved: ``no``, ``bf16``, ``fp16``); returns it."""
    setattr(model, _ATTRIBUTE, mode)
    return model


def mixed_precision_of(model) -> str:
    return getattr(model, _ATTRIBUTE, NO)


def autocast(model):
    """The context a forward pass of ``model``'s decoder runs in: ``torch.autocast`` for its mixed
    precision on its device, or nothing."""
    mode = mixed_precision_of(model)
    if mode == NO:
        return nullcontext()
    import torch

    device = model.get_input_embeddings().weight.device.type
    return torch.autocast(device, dtype={BF16: torch.bfloat16, FP16: torch.float16}[mode])
