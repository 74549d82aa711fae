"""Cost of one perturbed evaluation against a bare forward pass (a benchmark, not a test).

    python bench/bench_perturb.py [--windows 16] [--seq-len 256] [--k 100] [--repeats 3]

Loads the bundled SmolLM2-135M (de-quantised GGUF, fp32), cuts pydoc evaluation windows and
prints, best of ``--repeats`` interleaved rounds on the same windows:

- perturbed evaluation (apply sign_flip to the per-layer top-k of random scores, evaluate,
  restore bit-exactly with the checksum) / bare evaluation                          <= 1.1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from bundled import bundled_model_and_windows

from esa.evaluation import evaluate
from esa.perturb import perturbed
from esa.targets import find_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--k", type=int, default=100, help="weights per decoder layer")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, windows = bundled_model_and_windows(args.windows, args.seq_len)
    rng = np.random.default_rng(0)
    rows = []
    for layer in sorted({t.layer for t in find_targets(model)}):
        tensors = [t for t in find_targets(model) if t.layer == layer]
        for _ in range(args.k):
            t = tensors[rng.integers(len(tensors))]
            rows.append({"tensor": t.name, "flat_index": int(rng.integers(t.numel))})
    selection = pd.DataFrame(rows)
    bare, pert = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        evaluate(model, windows, args.batch_size)
        bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        with perturbed(model, selection, "sign_flip", 1.0):
            evaluate(model, windows, args.batch_size)
        pert.append(time.perf_counter() - start)
    print(f"{len(selection)} weights, {args.windows} windows x {args.seq_len} tokens, "
          f"threads {torch.get_num_threads()}")
    print(f"bare evaluation      {min(bare):.3f} s")
    print(f"perturbed evaluation {min(pert):.3f} s  (apply + evaluate + restore + checksum)")
    print(f"ratio {min(pert) / min(bare):.3f}  (target <= 1.1)")


if __name__ == "__main__":
    main()
