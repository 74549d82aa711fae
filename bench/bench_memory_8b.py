"""Peak memory of every phase on a model with Llama-3.1-8B's exact shapes and L decoder layers,
measured on the CPU, fitted as fixed + L x per-layer and extrapolated to all 32 layers.

    python bench/bench_memory_8b.py [--layers 1 2 3] [--dtypes bf16 fp32] [--out bench/memory_8b.json]

The model is ``bench/llama31_8b_config.json`` (hidden 4096, intermediate 14336, 32 heads / 8 KV
heads, vocabulary 128,256, context 131,072) with ``num_hidden_layers = L``, its weights filled with
a constant (no checkpoint needed: memory does not depend on the values). Each phase runs the
library function its workflow step runs, at the runbook's batch shapes (seq_len 512; evaluation
batch 4, one batch of windows; scoring batch 1, one window; one Hutchinson probe: the graph of a
batch serves every probe, so the probe count does not change the peak):

- ``baseline``: :func:`esa.evaluation.evaluate`;
- ``gradients`` / ``hutchinson`` / ``activations``: :func:`esa.scores.compute_scores` of
  grad_x_weight + grad_squared / hutchinson_diag / activation_magnitude, scoring every layer
  (``all``); the gradient metrics and Hutchinson also scoring layer 0 only (``one``: a
  ``scoring.layer_groups`` job of one layer), and the gradient metrics with
  ``scoring.gradient_checkpointing`` (``all+gc``);
- ``perturb``: a :class:`esa.damage.DamageMeter` on the windows and one measured zeroing of 100
  weights per layer (the perturb step's work per condition);
- ``confirm``: :func:`esa.confirm.zero_each` of one weight per layer (each in its own layer:
  the meter keeps the input of every such layer).

Peak = the bytes held before the phase (weights and buffers) + the peak of the CPU allocator's
tracked allocations during it (every allocation and free the c10 allocator reports to the torch
profiler, in time order): allocator bytes, not RSS. The fit over L gives ``fixed`` (embedding, LM
head, logits chunks, the KL's float64 temporaries) and ``per_layer``; a layer-group job of G
groups at 32 layers holds ``all``'s fixed and per-layer terms for its own 32/G layers and
``one``'s per-layer term for the other layers. Each (dtype, L) runs in its own process.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

CONFIG = Path(__file__).with_name("llama31_8b_config.json")
SEQ_LEN, EVAL_BATCH, FULL_LAYERS = 512, 4, 32
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def tracked_peak(fn) -> tuple[int, float]:
    """Peak bytes of the CPU allocator's tracked allocations while ``fn()`` runs (relative to
    its start), and the seconds it took."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    seconds = time.perf_counter() - start
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            events.append((node.start_time_ns, node.typed[1].alloc_size))
    live = np.cumsum([size for _, size in sorted(events)]) if events else np.zeros(1)
    return int(max(live.max(), 0)), seconds


def build(layers: int, dtype: torch.dtype, device: str = "cpu", **overrides):
    """The 8B-shaped model with ``layers`` decoder layers (``overrides``: other config values,
    e.g. tiny shapes for a smoke run), on ``device``, its weights a constant (norms 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**json.loads(CONFIG.read_text()), "num_hidden_layers": layers, **overrides})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if "norm" in name else 1e-3)
    with torch.device(device):  # its rotary buffers, which to_empty left uninitialised
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model


def phases(model, layers: int) -> dict:
    """phase -> the function that runs it once."""
    from esa.confirm import zero_each
    from esa.damage import Baseline, DamageMeter
    from esa.evaluation import evaluate
    from esa.perturb import perturbed
    from esa.scores import compute_scores
    from esa.targets import find_targets

    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (EVAL_BATCH, SEQ_LEN), generator=generator)
    sample = windows[:1]
    targets = find_targets(model)
    layer0 = [t for t in targets if t.layer == 0]
    baseline = Baseline.of(evaluate(model, windows, EVAL_BATCH))
    down = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(layers)]
    zeroed = pd.DataFrame({"tensor": np.repeat(down, 100), "flat_index": np.tile(np.arange(100), layers)})
    single = pd.DataFrame({"tensor": down, "layer": range(layers), "module": "mlp.down_proj", "expert": -1,
                           "part": "", "row": 0, "col": 0, "flat_index": 0, "weight": 1e-3, "score": 1.0})

    def scores(metrics, chosen, checkpointing=False):
        return lambda: compute_scores(model, chosen, sample, metrics, 1, 0, probes=1, progress=False,
                                      gradient_checkpointing=checkpointing)

    def perturb():
        meter = DamageMeter(model, windows, EVAL_BATCH, baseline)
        with perturbed(model, zeroed, "zero"):
            meter.measure(0)

    gradient, hutchinson, activation = ["grad_x_weight", "grad_squared"], ["hutchinson_diag"], ["activation_magnitude"]
    return {
        "baseline": lambda: evaluate(model, windows, EVAL_BATCH),
        "gradients/all": scores(gradient, targets),
        "gradients/one": scores(gradient, layer0),
        "gradients/all+gc": scores(gradient, targets, checkpointing=True),
        "hutchinson/all": scores(hutchinson, targets),
        "hutchinson/one": scores(hutchinson, layer0),
        "activations/all": scores(activation, targets),
        "perturb": perturb,
        "confirm": lambda: zero_each(model, single, windows, EVAL_BATCH, baseline),
    }


def measure_one(layers: int, dtype: str) -> list[dict]:
    torch.manual_seed(0)
    model = build(layers, DTYPES[dtype])
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    rows = []
    for phase, run in phases(model, layers).items():
        peak, seconds = tracked_peak(run)
        rows.append({"dtype": dtype, "layers": layers, "phase": phase, "held_bytes": held,
                     "peak_bytes": held + peak, "seconds": round(seconds, 2)})
        print(f"{dtype} L={layers} {phase:18s} peak {(held + peak) / 1e9:7.2f} GB  {seconds:6.1f} s", file=sys.stderr,
              flush=True)
    return rows


def fit(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (dtype, phase): least squares peak = fixed + L x per_layer over the measured L, the
    largest residual, and the extrapolation to 32 layers (GB = 1e9 bytes)."""
    out = []
    for (dtype, phase), group in rows.groupby(["dtype", "phase"], sort=False):
        per_layer, fixed = np.polyfit(group["layers"], group["peak_bytes"], 1)
        residual = np.abs(fixed + per_layer * group["layers"] - group["peak_bytes"]).max()
        out.append({"dtype": dtype, "phase": phase, "fixed_gb": fixed / 1e9, "per_layer_gb": per_layer / 1e9,
                    "max_residual_gb": residual / 1e9, "at_32_gb": (fixed + FULL_LAYERS * per_layer) / 1e9})
    return pd.DataFrame(out)


def layer_groups(fits: pd.DataFrame, groups: int) -> pd.DataFrame:
    """Extrapolated peak of one scores job of ``groups`` layer groups at 32 layers: ``all``'s
    fixed term, ``all``'s per-layer term for its 32/G layers, ``one``'s for the other layers."""
    table = fits.set_index(["dtype", "phase"])
    out = []
    for dtype in fits["dtype"].unique():
        for name in ("gradients", "hutchinson"):
            every, one = table.loc[(dtype, f"{name}/all")], table.loc[(dtype, f"{name}/one")]
            own = FULL_LAYERS / groups
            out.append({"dtype": dtype, "phase": f"{name}/layer_groups={groups}",
                        "at_32_gb": every["fixed_gb"] + own * every["per_layer_gb"]
                        + (FULL_LAYERS - own) * one["per_layer_gb"]})
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--out", default="bench/memory_8b.json")
    parser.add_argument("--one", nargs=2, metavar=("LAYERS", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(int(args.one[0]), args.one[1])))
        return
    rows = []
    for dtype in args.dtypes:
        for layers in args.layers:
            done = subprocess.run([sys.executable, __file__, "--one", str(layers), dtype], stdout=subprocess.PIPE,
                                  text=True, check=True)
            rows += json.loads(done.stdout)
            write(pd.DataFrame(rows), Path(args.out))  # after each (dtype, L): a long run keeps what it measured


def write(rows: pd.DataFrame, out: Path) -> None:
    """The measured rows, and the fits of the (dtype, phase) measured at two or more L."""
    fitted = rows.groupby(["dtype", "phase"])["layers"].transform("nunique") >= 2
    fits = fit(rows[fitted]) if fitted.any() else pd.DataFrame()
    groups = [layer_groups(fits, g) for g in (2, 4)] if not fits.empty else []
    extrapolated = pd.concat([fits, *groups], ignore_index=True)
    out.write_text(json.dumps({"measured": rows.to_dict("records"), "fit": extrapolated.to_dict("records")},
                              indent=1))
    with pd.option_context("display.width", 200, "display.float_format", "{:.2f}".format):
        print(extrapolated.to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
