"""What the KL costs in a measured evaluation (a benchmark, not a test).

    python bench/bench_kl.py [--windows 16] [--seq-len 256] [--batch-size 4] [--repeats 2]

Loads the bundled SmolLM2-135M (de-quantised GGUF, fp32, 49,152 classes), builds a
:class:`esa.damage.DamageMeter` on pydoc evaluation windows (the reference pass), and times
``DamageMeter.evaluate`` (the edited model's evaluation against the reference: NLL, KL, top-1)
with the KL's float64 work (:func:`esa.evaluation._kl_per_position`) timed inside it, for the
CPU block size of ``esa.evaluation.KL_BLOCK_ELEMENTS`` and for the old 2**25. Best of
``--repeats``; the KL values of the two block sizes must be the same bits.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bundled import bundled_model_and_windows

import esa.evaluation as evaluation
from esa.damage import Baseline, DamageMeter
from esa.evaluation import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model, windows = bundled_model_and_windows(args.windows, args.seq_len)
    meter = DamageMeter(model, windows, args.batch_size, Baseline.of(evaluate(model, windows, args.batch_size)))
    kl_function, spent = evaluation._kl_per_position, []

    def timed(*args):
        start = time.perf_counter()
        result = kl_function(*args)
        spent[-1] += time.perf_counter() - start
        return result

    evaluation._kl_per_position = timed
    cpu_block = evaluation.KL_BLOCK_ELEMENTS["cpu"]
    rows, kls = {}, {}
    for block in (cpu_block, 2**25):
        evaluation.KL_BLOCK_ELEMENTS["cpu"] = block
        best = None
        for _ in range(args.repeats):
            spent.append(0.0)
            start = time.perf_counter()
            result = meter.evaluate()
            total = time.perf_counter() - start
            best = min(best or (total, spent[-1]), (total, spent[-1]))
        rows[block], kls[block] = best, result.kl
    evaluation.KL_BLOCK_ELEMENTS["cpu"] = cpu_block
    print(f"{args.windows} windows x {args.seq_len} tokens, batch {args.batch_size}, "
          f"{model.config.vocab_size} classes, threads {torch.get_num_threads()}")
    for block, (total, kl) in rows.items():
        print(f"KL blocks of 2**{int(np.log2(block))} float64 elements: evaluation {total:.2f} s, "
              f"KL {kl:.2f} s ({kl / total:.1%})")
    print("the same KL bits:", np.array_equal(kls[cpu_block], kls[2**25]))


if __name__ == "__main__":
    main()
