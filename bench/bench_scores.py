"""Cost of esa.scores against the bare passes it is built on (a benchmark script, not a test).

    python bench/bench_scores.py [--model SOURCE] [--windows 4] [--seq-len 256] [--batch-size 2]

Loads a causal LM in fp32 with esa's own loader (any model source esa takes; default: the
bundled builtin:smollm2-135m, de-quantised), cuts windows of the calibration part of
builtin:pydoc as the workflow does, and prints, in one process:

- gradient metrics (grad_x_weight + grad_squared, one pass) / bare forward+backward   <= 1.15
- activation_magnitude / bare forward                                                  <= 1.25
- one Hutchinson probe after the first / bare forward+backward of the same batch       <= 2
- peak memory of each scoring run vs. its budget: the bare pass's peak plus one fp32 copy
  of the targets per accumulator (2 for the gradient metrics, 1 for Hutchinson, 0 for
  activations).

"Bare" is exactly what the metric cannot avoid: the same chunked loss and, for the backward,
gradients of the target weights only (the scorer freezes everything else too). Ratios are the
median over ``--repeats`` interleaved rounds of the ratio within a round. CPU memory is the
process RSS sampled by a thread (torch allocations are invisible to tracemalloc) above its
level at the start, after returning freed heap to the OS; CUDA memory is
``max_memory_allocated`` above the allocation at the start.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import threading
import time

import psutil
import torch

from esa.data import load_documents, make_windows
from esa.evaluation import mean_token_loss, window_nll
from esa.models import load_model, load_tokenizer, resolve_source
from esa.scores import compute_scores
from esa.targets import find_targets, target_parameter

MiB = 2 ** 20


def pydoc_windows(tokenizer, count: int, seq_len: int) -> torch.Tensor:
    """The first ``count`` calibration windows of builtin:pydoc (esa.data's split and cut)."""
    calib_docs, _ = load_documents("builtin:pydoc", tokenizer=tokenizer)
    windows = make_windows(tokenizer, calib_docs, seq_len)
    if len(windows) < count:
        raise SystemExit(f"pydoc text gives {len(windows)} windows of {seq_len} tokens, fewer than {count}")
    return torch.from_numpy(windows[:count]).long()


class PeakMemory:
    """Peak memory above the level at entry, in bytes, on CPU (RSS) or CUDA (allocator)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak = 0

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        try:  # give freed heap back to the OS so RSS starts from what is live
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.process = psutil.Process()
        self.start = self.high = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.high = max(self.high, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.high, self.process.memory_info().rss) - self.start


def measure(cases: dict, device: torch.device, repeats: int) -> dict[str, tuple[list[float], int]]:
    """Wall times of each case in ``repeats`` interleaved rounds and the highest peak memory.

    Ratios are taken within a round and their median reported: on a shared machine the load
    changes between rounds, and a best time of one case against a best of another compares
    two different loads.
    """
    times = {name: [] for name in cases}
    peaks = dict.fromkeys(cases, 0)
    for _ in range(repeats):
        for name, fn in cases.items():
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                result = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
                del result
            peaks[name] = max(peaks[name], memory.peak)
    return {name: (times[name], peaks[name]) for name in cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m",
                        help="model source: hub id, directory, .gguf file or builtin")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--probes", type=int, default=3, help="probes of the long Hutchinson run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 keeps timings stable on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    started = time.perf_counter()
    source = resolve_source(args.model)
    model, tokenizer = load_model(source, args.device, "fp32"), load_tokenizer(source)
    windows = pydoc_windows(tokenizer, args.windows, args.seq_len)
    targets = find_targets(model)
    params = [target_parameter(model, t) for t in targets]
    for p in model.parameters():  # as during scoring: only the targets need gradients
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    batches = list(windows.split(args.batch_size))
    n_batches = len(batches)
    copy = 4 * sum(t.numel for t in targets)  # one fp32 copy of the targets
    print(f"model {args.model} loaded in {time.perf_counter() - started:.1f} s on "
          f"{device} ({torch.get_num_threads()} threads), attention "
          f"{model.config._attn_implementation}; {len(targets)} targets, {copy / 4 / 1e6:.1f} M weights "
          f"({copy / MiB:.0f} MiB per fp32 copy); {n_batches} batches of {args.batch_size} x {args.seq_len}")

    def bare_forward():
        with torch.no_grad():
            for batch in batches:
                window_nll(model, batch.to(device))

    def bare_forward_backward():
        for batch in batches:
            grads = torch.autograd.grad(mean_token_loss(model, batch.to(device)), params)
            del grads

    def score(metrics, probes=1):
        return lambda: compute_scores(model, targets, windows, metrics, batch_size=args.batch_size,
                                      seed=0, probes=probes, progress=False)

    results = measure({"fwd": bare_forward, "fwd_bwd": bare_forward_backward,
                       "grad": score(["grad_x_weight", "grad_squared"]),
                       "act": score(["activation_magnitude"]),
                       "hut1": score(["hutchinson_diag"], 1),
                       "hutp": score(["hutchinson_diag"], args.probes)}, device, args.repeats)
    (fwd, fwd_mem), (fwd_bwd, fwd_bwd_mem), (grad, grad_mem), (act, act_mem), (hut1, hut1_mem), \
        (hutp, hutp_mem) = results.values()
    # one probe per batch, from the extra probes of the long run
    probe = [(p - h) / ((args.probes - 1) * n_batches) for p, h in zip(hutp, hut1)]
    per_batch = [t / n_batches for t in fwd_bwd]

    def ratio(case, base):
        return statistics.median(c / b for c, b in zip(case, base))

    rows = [
        ("gradient metrics / fwd+bwd", ratio(grad, fwd_bwd), 1.15, grad_mem, fwd_bwd_mem + 2 * copy),
        ("activation_magnitude / fwd", ratio(act, fwd), 1.25, act_mem, fwd_mem),
        ("Hutchinson probe / fwd+bwd", ratio(probe, per_batch), 2.0, hutp_mem, fwd_bwd_mem + copy),
    ]

    def seconds(times):
        return "/".join(f"{t:.2f}" for t in times)

    print(f"\nseconds per round: bare forward {seconds(fwd)}, forward+backward {seconds(fwd_bwd)}, "
          f"gradient metrics {seconds(grad)}, activations {seconds(act)}, Hutchinson 1 probe "
          f"{seconds(hut1)}, {args.probes} probes {seconds(hutp)}; one probe per batch {seconds(probe)}")
    print(f"peak MiB: bare forward {fwd_mem / MiB:.0f}, forward+backward {fwd_bwd_mem / MiB:.0f}, "
          f"Hutchinson 1 probe {hut1_mem / MiB:.0f}")
    print(f"\n{'median ratio of a round':30} {'time':>6} {'target':>7}  {'peak MiB':>9} {'budget MiB':>10} "
          f"{'mem ratio':>9}")
    for label, value, target, peak, budget in rows:
        verdict = "ok" if value <= target else "MISSED"
        print(f"{label:30} {value:6.2f} {target:7.2f}  {peak / MiB:9.0f} {budget / MiB:10.0f} "
              f"{peak / budget:9.2f}  {verdict}")

    trace = score(["activation_magnitude"])()["activation_magnitude"].extra["massive_activations"]
    print("\nlargest down_proj activations:")
    print(trace.sort_values("value", ascending=False).head(6).to_string(index=False))


if __name__ == "__main__":
    main()
