"""Every phase on the 8B-shaped model on one device: peak memory and wall time of each, tokens per
second forward and forward + backward, and the model FLOPs utilisation against the device's bf16 peak.

    python bench/gpu_check.py --out DIR/gpu_check.json [--tests DIR/tests.xml] [--cpu-smoke] [--peak-tflops X]

On CUDA: the 32-layer Llama-3.1-8B shapes in bf16, peak = ``torch.cuda.max_memory_allocated``
per phase (reset before each). With ``--cpu-smoke``: 2 layers of tiny shapes on the CPU, peak =
the CPU allocator's tracked bytes (:func:`esa.allocator.tracked_peak`), so CI runs this very
script and it cannot rot. The phases are :func:`bench_memory_8b.phases` (the library functions
the workflow steps run, at the runbook's batch shapes).

Throughput: ``--repeats`` timed passes of one batch of 4 x 512 tokens after one warm-up:
forward under no_grad, and forward + backward of the mean token loss (every weight requiring a
gradient). Model FLOPs per token: forward ``2 N + 4 L T H`` (N parameters without the input
embedding, L layers, T = 512 positions, H hidden: the weight matmuls and QK^T, AV without the
causal saving), forward + backward three times that; MFU = achieved FLOP/s / the bf16 dense peak
(``--peak-tflops``, else the table below by device name, else null).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from esa.allocator import tracked_peak

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory_8b import EVAL_BATCH, SEQ_LEN, build, phases  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10G": 70.0}
SMOKE_SHAPES = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 16, "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2}


def peak_tflops(device: str, override: float | None) -> float | None:
    if override is not None or device == "cpu":
        return override
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def run_phase(run, device: str) -> tuple[int, float]:
    """Peak bytes and seconds of one phase on ``device``."""
    if device == "cpu":
        return tracked_peak(run)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), time.perf_counter() - start


def throughput(model, device: str, repeats: int) -> dict:
    """Tokens per second forward and forward + backward, and the model FLOPs per token."""
    from esa.evaluation import mean_token_loss

    config = model.config
    ids = torch.randint(0, config.vocab_size, (EVAL_BATCH, SEQ_LEN), device=device)
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    forward_flops = 2 * params + 4 * config.num_hidden_layers * SEQ_LEN * config.hidden_size

    def timed(step) -> float:
        step()  # warm-up: kernels, allocator
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        if device != "cpu":
            torch.cuda.synchronize()
        return EVAL_BATCH * SEQ_LEN * repeats / (time.perf_counter() - start)

    def forward():
        with torch.no_grad():
            mean_token_loss(model, ids)

    def forward_backward():
        mean_token_loss(model, ids).backward()
        model.zero_grad(set_to_none=True)

    model.requires_grad_(False)
    tokens_forward = timed(forward)
    model.requires_grad_(True)
    tokens_backward = timed(forward_backward)
    model.requires_grad_(False)
    return {"forward_tokens_per_s": tokens_forward, "forward_backward_tokens_per_s": tokens_backward,
            "forward_flops_per_token": forward_flops, "forward_backward_flops_per_token": 3 * forward_flops}


def test_summary(path: str | None) -> dict | None:
    """Counts of a pytest junit XML (the device tests of gpu_check.sh)."""
    if path is None:
        return None
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tests", help="the device tests' junit XML, summarised into the JSON")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --cpu-smoke for the CPU run)")
    layers = 2 if args.cpu_smoke else 32
    model = build(layers, torch.bfloat16, device, **(SMOKE_SHAPES if args.cpu_smoke else {}))
    record = {"device": "cpu" if device == "cpu" else torch.cuda.get_device_name(), "dtype": "bf16",
              "layers": layers, "seq_len": SEQ_LEN, "eval_batch": EVAL_BATCH, "torch": torch.__version__,
              "tests": test_summary(args.tests), "phases": []}
    for phase, run in phases(model, layers).items():
        peak, seconds = run_phase(run, device)
        record["phases"].append({"phase": phase, "peak_gb": peak / 1e9, "seconds": round(seconds, 3)})
        print(f"{phase:18s} peak {peak / 1e9:8.3f} GB  {seconds:8.2f} s", file=sys.stderr, flush=True)
    speed = throughput(model, device, args.repeats)
    peak = peak_tflops(device, args.peak_tflops)
    speed["bf16_peak_tflops"] = peak
    for kind in ("forward", "forward_backward"):
        achieved = speed[f"{kind}_tokens_per_s"] * speed[f"{kind}_flops_per_token"]
        speed[f"{kind}_tflops"] = achieved / 1e12
        speed[f"{kind}_mfu"] = achieved / (peak * 1e12) if peak else None
    record["throughput"] = speed
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(speed, indent=1))


if __name__ == "__main__":
    main()
