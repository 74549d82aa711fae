"""Peak memory of every phase on a model with Llama-3.1-8B's exact shapes and L decoder layers,
measured on the CPU, fitted as fixed + L x per-layer and extrapolated to all 32 layers.

    python bench/bench_memory_8b.py [--layers 1 2 3] [--dtypes bf16 fp32] [--phases ...]
                                    [--out bench/memory_8b.json] [--table]

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
``one``'s per-layer term for the other layers.

Each (dtype, L) runs in its own process and is merged into ``--out`` as it finishes (rows of
other (dtype, L, phase) already there are kept). A phase whose peak the line through the smaller
L predicts above ``MemAvailable`` is skipped, and one that still kills its process (the kernel's
out-of-memory killer) is recorded; both are listed under ``skipped``. At one layer ``one`` is the
same job as ``all`` and is not run twice. ``--table`` prints the README's tables from ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from esa.allocator import tracked_peak

CONFIG = Path(__file__).with_name("llama31_8b_config.json")
SEQ_LEN, EVAL_BATCH, FULL_LAYERS = 512, 4, 32
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PHASES = ("baseline", "gradients/all", "gradients/one", "gradients/all+gc", "hutchinson/all", "hutchinson/one",
          "activations/all", "perturb", "confirm")


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
    runs = {
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
    assert tuple(runs) == PHASES
    return runs


def measure_one(layers: int, dtype: str, names: list[str]) -> None:
    """Print the measured row of each phase of ``names`` at ``layers`` layers in ``dtype``, a JSON
    line each as it finishes (a killed run keeps the ones before)."""
    torch.manual_seed(0)
    model = build(layers, DTYPES[dtype])
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for phase, run in phases(model, layers).items():
        if phase not in names:
            continue
        peak, seconds = tracked_peak(run)
        print(json.dumps({"dtype": dtype, "layers": layers, "phase": phase, "held_bytes": held,
                          "peak_bytes": held + peak, "seconds": round(seconds, 2)}), flush=True)
        print(f"{dtype} L={layers} {phase:18s} peak {(held + peak) / 1e9:7.2f} GB  {seconds:6.1f} s", file=sys.stderr,
              flush=True)


def available_bytes() -> int:
    """The memory the kernel says a new process can take without swapping (MemAvailable)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def predicted_peak(rows: pd.DataFrame, dtype: str, phase: str, layers: int) -> float | None:
    """The peak at ``layers`` by the line through the smaller L measured (two or more), else None."""
    if rows.empty:
        return None
    smaller = rows[(rows["dtype"] == dtype) & (rows["phase"] == phase) & (rows["layers"] < layers)]
    if smaller["layers"].nunique() < 2:
        return None
    per_layer, fixed = np.polyfit(smaller["layers"], smaller["peak_bytes"], 1)
    return fixed + per_layer * layers


def fit(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (dtype, phase): least squares peak = fixed + L x per_layer over the measured L, the
    largest residual, and the extrapolation to 32 layers (GB = 1e9 bytes)."""
    out = []
    for (dtype, phase), group in rows.groupby(["dtype", "phase"], sort=False):
        per_layer, fixed = np.polyfit(group["layers"], group["peak_bytes"], 1)
        residual = np.abs(fixed + per_layer * group["layers"] - group["peak_bytes"]).max()
        out.append({"dtype": dtype, "phase": phase, "points": group["layers"].nunique(),
                    "fixed_gb": fixed / 1e9, "per_layer_gb": per_layer / 1e9,
                    "max_residual_gb": residual / 1e9, "at_32_gb": (fixed + FULL_LAYERS * per_layer) / 1e9})
    return pd.DataFrame(out)


def layer_groups(fits: pd.DataFrame, groups: int) -> pd.DataFrame:
    """Extrapolated peak of one scores job of ``groups`` layer groups at 32 layers: ``all``'s
    fixed term, ``all``'s per-layer term for its 32/G layers, ``one``'s for the other layers."""
    table = fits.set_index(["dtype", "phase"])
    out = []
    for dtype in fits["dtype"].unique():
        for name in ("gradients", "hutchinson"):
            if (dtype, f"{name}/all") not in table.index or (dtype, f"{name}/one") not in table.index:
                continue
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
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--out", default="bench/memory_8b.json",
                        help="kept rows of other (dtype, L, phase) already in it are merged")
    parser.add_argument("--headroom-gb", type=float, default=1.0,
                        help="skip a phase whose predicted peak leaves less than this of MemAvailable")
    parser.add_argument("--table", action="store_true", help="print --out's figures as the README's tables")
    parser.add_argument("--one", nargs=2, metavar=("LAYERS", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    if args.one:
        measure_one(int(args.one[0]), args.one[1], args.phases)
        return
    out = Path(args.out)
    kept = json.loads(out.read_text()) if out.exists() else {"measured": [], "skipped": []}
    redo = {(d, n, p) for d in args.dtypes for n in args.layers for p in args.phases}
    rows = [r for r in kept["measured"] if (r["dtype"], r["layers"], r["phase"]) not in redo]
    skipped = [r for r in kept.get("skipped", []) if (r["dtype"], r["layers"], r["phase"]) not in redo]
    for dtype in args.dtypes:
        for layers in sorted(args.layers):
            names, same = [], []
            for phase in args.phases:
                predicted, available = predicted_peak(pd.DataFrame(rows), dtype, phase, layers), available_bytes()
                if predicted is not None and predicted > available - args.headroom_gb * 1e9:
                    skipped.append({"dtype": dtype, "layers": layers, "phase": phase,
                                    "predicted_gb": round(predicted / 1e9, 2),
                                    "available_gb": round(available / 1e9, 2)})
                    print(f"{dtype} L={layers} {phase}: skipped, predicted {predicted / 1e9:.1f} GB > "
                          f"{available / 1e9:.1f} GB available - {args.headroom_gb} GB", file=sys.stderr)
                elif layers == 1 and phase.endswith("/one") and phase.replace("/one", "/all") in args.phases:
                    same.append(phase)  # at one layer, layer 0 is every layer: the same job as /all
                else:
                    names.append(phase)
            measured = []
            while names:  # a phase that kills its process (out of memory) is recorded, the others still run
                done = subprocess.run([sys.executable, __file__, "--one", str(layers), dtype, "--phases", *names],
                                      stdout=subprocess.PIPE, text=True)
                measured += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
                names = [p for p in names if p not in {r["phase"] for r in measured}]
                if done.returncode != 0 and names:
                    skipped.append({"dtype": dtype, "layers": layers, "phase": names[0],
                                    "failed": f"its process ended with status {done.returncode}"})
                    names = names[1:]
                elif done.returncode != 0:
                    raise SystemExit(f"the measuring process ended with status {done.returncode}")
            by_phase = {r["phase"]: r for r in measured}
            rows += measured + [{**by_phase[p.replace("/one", "/all")], "phase": p,
                                 "same_as": p.replace("/one", "/all")}
                                for p in same if p.replace("/one", "/all") in by_phase]
            write(rows, skipped, out)  # after each (dtype, L): a long run keeps what it measured


def write(rows: list[dict], skipped: list[dict], out: Path) -> None:
    """The measured rows, the skipped phases, and the fits of the (dtype, phase) measured at two
    or more L."""
    order = {phase: i for i, phase in enumerate(PHASES)}
    rows = sorted(rows, key=lambda r: (r["dtype"], r["layers"], order[r["phase"]]))
    frame = pd.DataFrame(rows)
    fitted = frame.groupby(["dtype", "phase"])["layers"].transform("nunique") >= 2
    fits = fit(frame[fitted]) if fitted.any() else pd.DataFrame()
    groups = [layer_groups(fits, g) for g in (2, 4, 8)] if not fits.empty else []
    extrapolated = pd.concat([fits, *groups], ignore_index=True)
    fit_rows = [{k: v for k, v in r.items() if v == v} for r in extrapolated.to_dict("records")]  # no NaN
    out.write_text(json.dumps({"measured": rows, "skipped": skipped, "fit": fit_rows}, indent=1))
    with pd.option_context("display.width", 200, "display.float_format", "{:.2f}".format):
        print(extrapolated.to_string(index=False), flush=True)


def _not_measured(skip: dict | None) -> str:
    if skip is None:
        return ""
    return f"over RAM ({skip['predicted_gb']:.1f} predicted)" if "predicted_gb" in skip else "process killed"


def markdown(result: dict) -> str:
    """One table per dtype: the peak at each L measured, the fit, and the peak at 32 layers (GB)."""
    rows, fits = pd.DataFrame(result["measured"]), pd.DataFrame(result["fit"])
    skipped = {(r["dtype"], r["layers"], r["phase"]): r for r in result.get("skipped", [])}
    tables = []
    for dtype in sorted(rows["dtype"].unique(), key=list(DTYPES).index):
        ls = sorted(rows.loc[rows["dtype"] == dtype, "layers"].unique())
        lines = [f"| phase ({dtype}) | " + " | ".join(f"L={n}" for n in ls)
                 + " | fixed | per layer | max residual | at 32 layers |", "|---" * (len(ls) + 5) + "|"]
        for fit_row in fits[fits["dtype"] == dtype].to_dict("records"):
            phase = fit_row["phase"]
            cells = []
            for n in ls:
                at = (rows["dtype"] == dtype) & (rows["layers"] == n) & (rows["phase"] == phase)
                peak = rows.loc[at, "peak_bytes"]
                cells.append(f"{peak.iloc[0] / 1e9:.2f}" if len(peak)
                             else _not_measured(skipped.get((dtype, n, phase))))
            terms = ([f"{fit_row['fixed_gb']:.2f}", f"{fit_row['per_layer_gb']:.3f}",
                      f"{fit_row['max_residual_gb']:.3f}" if fit_row["points"] > 2 else "(2 points)"]
                     if "fixed_gb" in fit_row and fit_row["fixed_gb"] == fit_row["fixed_gb"] else ["", "", ""])
            lines.append(f"| {phase} | " + " | ".join(cells + terms) + f" | **{fit_row['at_32_gb']:.1f}** |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


if __name__ == "__main__":
    main()
