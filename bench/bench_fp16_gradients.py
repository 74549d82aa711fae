"""How much of the bundled model's target gradients fp16 would lose without loss scaling: one fp32
backward of the mean token loss on 4 x 256 tokens of the built-in text, then the fraction of
gradient entries fp16 rounds to zero (0 < |g| < 2^-25) and holds only as a subnormal (|g| < 2^-14).

    python bench/bench_fp16_gradients.py
"""

import time

import torch

from esa import data, models
from esa.evaluation import mean_token_loss
from esa.targets import find_targets, target_parameter

source = models.resolve_source("builtin:smollm2-135m")
tokenizer = models.load_tokenizer(source)
calibration, _ = data.load_documents("builtin:pydoc", tokenizer=tokenizer)
windows = torch.from_numpy(data.make_windows(tokenizer, calibration, 256)[:4])
model = models.load_model(source, "cpu", "fp32", "sdpa")
start = time.perf_counter()
mean_token_loss(model, windows).backward()
parameters = {t.name: target_parameter(model, t) for t in find_targets(model)}.values()
g = torch.cat([p.grad.flatten() for p in parameters]).abs()
print(f"{len(g):,} target weights; forward + backward {time.perf_counter() - start:.1f} s")
print(f"median |g| {g.median().item():.2e}; exactly 0 in fp32: {(g == 0).double().mean().item():.2e}")
print(f"fp16 rounds to 0 (0 < |g| < 2^-25): {((g > 0) & (g < 2**-25)).double().mean().item():.4%}")
print(f"fp16 subnormal (|g| < 2^-14): {(g < 2**-14).double().mean().item():.4%}")
