"""The confirm step with layer skipping against evaluating the whole model per ablation.

    python bench/bench_confirm.py [--windows 16] [--seq-len 256] [--top-n 7]

Loads the bundled SmolLM2-135M (de-quantised GGUF, fp32), scores grad_x_weight, grad_squared
and activation_magnitude on 4 pydoc calibration windows, takes every metric's global top-N
(deduplicated, as the confirm step does) and times on the pydoc evaluation windows:

- old: each weight zeroed alone and the whole model evaluated, then the activation trace and
  the rerun of the unmodified model (three separate kinds of pass);
- new: :func:`esa.confirm.zero_each`, as the confirm step runs it (the trace pass, the damage
  meter's reference pass that keeps the candidate layers' inputs, each ablation from its layer on
  with its KL and bootstrap interval, then the rerun).

and checks that both give the same ppl_after, trace and rerun, bit for bit.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from esa.candidates import build_candidates
from esa.confirm import WEIGHT_KEY, activation_trace, global_top, zero_each
from esa.damage import Baseline
from esa.data import load_documents, make_windows
from esa.evaluation import evaluate
from esa.models import load_model, load_tokenizer, resolve_source
from esa.perturb import perturbed
from esa.replay import first_changed_layer
from esa.scores import compute_scores
from esa.targets import find_targets, target_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--top-n", type=int, default=7, help="weights per metric")
    args = parser.parse_args()
    source = resolve_source("builtin:smollm2-135m")
    model = load_model(source, "cpu", "fp32", "sdpa")
    calib_docs, eval_docs = load_documents("builtin:pydoc")
    tokenizer = load_tokenizer(source)
    calib = torch.from_numpy(make_windows(tokenizer, calib_docs, args.seq_len)[:4]).long()
    windows = torch.from_numpy(make_windows(tokenizer, eval_docs, args.seq_len)[: args.windows]).long()
    targets = find_targets(model)
    scores = compute_scores(model, targets, calib, ["grad_x_weight", "grad_squared", "activation_magnitude"],
                            args.batch_size, seed=0, progress=False)
    table = target_table(targets)
    tops = pd.concat([global_top(build_candidates(targets, s.weights, s.stat, s.score, args.top_n), table, args.top_n)
                      for s in scores.values()], ignore_index=True)
    chosen = tops.drop_duplicates(WEIGHT_KEY)  # the weights, and the order, confirm tests
    starts = [first_changed_layer(model, name) for name in chosen["tensor"]]
    layers = len(model.get_decoder().layers)
    print(f"{len(chosen)} weights in layers {sorted(starts)}; {args.windows} windows x {args.seq_len} "
          f"tokens, threads {torch.get_num_threads()}")
    share = sum(layers - s for s in starts) / layers / len(starts)
    print(f"share of decoder-layer work left per ablation: {share:.2f}")
    unmodified = evaluate(model, windows, args.batch_size)
    baseline = Baseline.of(unmodified)

    start = time.perf_counter()
    old = []
    for i in range(len(chosen)):
        with perturbed(model, chosen.iloc[i:i + 1], "zero"):
            old.append(evaluate(model, windows, args.batch_size).ppl)
    old_trace = activation_trace(model, windows, args.batch_size)
    old_rerun = evaluate(model, windows, args.batch_size)
    old_seconds = time.perf_counter() - start

    start = time.perf_counter()
    new = zero_each(model, chosen, windows, args.batch_size, baseline)
    new_seconds = time.perf_counter() - start

    print(f"old confirm {old_seconds:.1f} s   new confirm {new_seconds:.1f} s   "
          f"speed-up {old_seconds / new_seconds:.2f}x")
    assert new.super_weights["ppl_after"].tolist() == old, "ppl_after differs"
    pd.testing.assert_frame_equal(new.activations, old_trace)
    assert new.rerun.metrics() == old_rerun.metrics() == unmodified.metrics()
    print("identical ppl_after, trace and rerun")


if __name__ == "__main__":
    main()
