"""The Hutchinson job's working memory against the gradient job's, on the bundled model at the
embedded default's scoring batch (4 windows of 256 tokens, batch 4), both measured as the peak
of the CPU allocator's tracked allocations (:func:`esa.allocator.tracked_peak`) above the loaded
model. One Hutchinson probe: the probes run one after another on the same graph, so more of them
add time, not memory.

    python bench/bench_hutchinson_memory.py
"""

from __future__ import annotations

import torch

from bundled import bundled_model_and_windows
from esa.allocator import tracked_peak
from esa.scores import compute_scores
from esa.targets import find_targets


def main() -> None:
    torch.set_num_threads(2)
    model, windows = bundled_model_and_windows(windows=4, seq_len=256)
    targets = find_targets(model)
    peaks = {}
    for job, metrics in {"gradients": ["grad_x_weight", "grad_squared"], "hutchinson": ["hutchinson_diag"]}.items():
        peak, seconds = tracked_peak(lambda metrics=metrics: compute_scores(
            model, targets, windows, metrics, batch_size=4, seed=0, probes=1, progress=False))
        peaks[job] = peak
        print(f"{job}: {peak / 1e9:.2f} GB above the model, {seconds:.1f} s")
    print(f"hutchinson / gradients: {peaks['hutchinson'] / peaks['gradients']:.2f}x")


if __name__ == "__main__":
    main()
