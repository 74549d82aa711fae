"""Sensitivity metrics against independent references: a manual per-batch autograd loop,
manual activation hooks, and the exact Hessian by brute force."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama, unigram_text
from torch.nn.attention import SDPBackend, sdpa_kernel

from esa.evaluation import mean_token_loss
from esa.metrics import METRICS
from esa.metrics import gradient_pass
from esa.scores import compute_scores
from esa.targets import find_targets


pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(windows, batch_size):
    return [windows[s:s + batch_size] for s in range(0, len(windows), batch_size)]


def _hf_loss(model, batch):
    """Mean token NLL from the model's full logits, independent of esa.evaluation. (Not
    transformers' ``labels=`` loss: it casts logits to fp32, spoiling the fp64 references.)"""
    logits = model(input_ids=batch).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def _close(actual, expected):
    """fp32 accumulation of fp64 references: 1e-6 relative to the tensor's scale."""
    torch.testing.assert_close(actual.double(), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_gradient_metrics_match_manual_loop(tiny_windows):
    model = make_tiny_llama(dtype=torch.float64)  # reference in fp64; esa accumulates in fp32
    targets = find_targets(model, include=["embed_tokens"])
    names = [t.name for t in targets]
    per_batch = []
    for batch in _batches(tiny_windows, 2):  # L_b by its definition, g_b by plain autograd
        grads = torch.autograd.grad(mean_token_loss(model, batch), [model.get_parameter(n) for n in names])
        per_batch.append(dict(zip(names, grads)))

    result = compute_scores(model, targets, tiny_windows, ["grad_x_weight", "grad_squared"],
                            batch_size=2, seed=0, progress=False)
    raw = compute_scores(model, targets, tiny_windows, ["grad_squared"], batch_size=2, seed=0,
                         weighting="raw", progress=False)["grad_squared"]
    for name in names:
        w = model.get_parameter(name).detach()
        gbar = sum(g[name] for g in per_batch) / 3
        fisher = sum(g[name] ** 2 for g in per_batch) / 3
        gxw, gsq = result["grad_x_weight"], result["grad_squared"]
        assert gxw.stat[name].dtype == gsq.score[name].dtype == torch.float32
        _close(gxw.stat[name], gbar)
        _close(gsq.stat[name], fisher)
        _close(gxw.score[name], (w * gbar).abs())
        _close(gsq.score[name], 0.5 * fisher * w ** 2)
        torch.testing.assert_close(raw.score[name], raw.stat[name].abs())
    # mean of per-batch squares, not the square of the mean
    assert not torch.allclose(gsq.stat[name], gxw.stat[name] ** 2)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_one_gradient_pass_serves_every_gradient_metric(tiny_llama, tiny_windows):
    calls = []
    tiny_llama.model.register_forward_hook(lambda *args: calls.append(1))
    targets = find_targets(tiny_llama)
    compute_scores(tiny_llama, targets, tiny_windows, ["grad_x_weight", "grad_squared", "hutchinson_diag"],
                   batch_size=2, seed=0, probes=2, progress=False)
    # with a second-order metric, one decoder forward per window (6 windows in 3 batches); the
    # first-order metrics and every probe reuse them
    assert len(calls) == 6


def test_activation_magnitude_matches_manual_input_hooks(tiny_llama, tiny_windows):
    targets = find_targets(tiny_llama, include=["embed_tokens"])
    inputs, outputs = {}, {}

    def keep(name):
        def hook(module, args, output):
            inputs.setdefault(name, []).append(args[0].detach())
            outputs.setdefault(name, []).append(output.detach())
        return hook

    handles = [tiny_llama.get_submodule(t.module_path).register_forward_hook(keep(t.name))
               for t in targets[1:]]
    with torch.no_grad():
        for batch in _batches(tiny_windows, 4):
            tiny_llama(input_ids=batch)
    for handle in handles:
        handle.remove()

    result = compute_scores(tiny_llama, targets, tiny_windows, ["activation_magnitude"],
                            batch_size=4, seed=0, progress=False)["activation_magnitude"]
    for t in targets[1:]:
        x = torch.cat(inputs[t.name]).reshape(-1, t.cols)
        l2 = x.pow(2).sum(0).sqrt()
        torch.testing.assert_close(result.stat[t.name], l2.expand(t.rows, t.cols))
        w = tiny_llama.get_parameter(t.name).detach()
        torch.testing.assert_close(result.score[t.name], w.abs() * l2[None, :])

    counts = torch.bincount(tiny_windows.flatten(), minlength=64).float()
    embed = targets[0].name
    torch.testing.assert_close(result.stat[embed], counts.sqrt()[:, None].expand(64, 16))

    trace = result.extra["massive_activations"].set_index(["layer", "side"])
    for layer in (0, 1):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        for side, seen in (("input", inputs), ("output", outputs)):
            x = torch.cat(seen[name]).abs()  # [windows, positions, channels]
            window, position, channel = np.unravel_index(int(x.argmax()), x.shape)
            row = trace.loc[(layer, side)]
            assert row["value"] == pytest.approx(float(x.max()))
            assert (row["window"], row["position"], row["channel"]) == (window, position, channel)
            assert row["token"] == tiny_windows[window, position]


def _hessian_setup():
    """A very small fp64 Llama on SDPA attention with 448 target weights in 6 tensors over 2
    layers, and one batch of windows."""
    model = make_tiny_llama(layers=2, hidden=8, intermediate=16, vocab=32, dtype=torch.float64)
    model.set_attn_implementation("sdpa")  # esa must switch it to the math backend
    targets = find_targets(model, exclude=["q_proj", "k_proj", "gate_proj", "up_proj"])
    windows = torch.randint(0, 32, (4, 10), generator=torch.Generator().manual_seed(3))
    return model, targets, windows


def _flat_grad(model, params, windows, create_graph=False):
    grads = torch.autograd.grad(_hf_loss(model, windows), params, create_graph=create_graph)
    return torch.cat([g.flatten() for g in grads])


def _exact_hessian(model, params, windows):
    """Full Hessian over the flattened targets: row i is the HVP with one-hot vector e_i
    (all rows in one batched double backward)."""
    flat = _flat_grad(model, params, windows, create_graph=True)
    eye = torch.eye(flat.numel(), dtype=flat.dtype)
    return torch.autograd.grad(flat, params, grad_outputs=eye, is_grads_batched=True)


def test_hutchinson_matches_exact_hessian_diagonal():
    model, targets, windows = _hessian_setup()
    params = [model.get_parameter(t.name) for t in targets]
    with sdpa_kernel(SDPBackend.MATH):
        rows = _exact_hessian(model, params, windows)
        hessian = torch.cat([r.flatten(1) for r in rows], dim=1)
        torch.testing.assert_close(hessian, hessian.T)

        # the HVPs agree with central differences of the gradient (no double backward); the
        # model computes its norms in fp32, hence the loose tolerance
        v = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        steps = [dv.view_as(p) for p, dv in zip(params, v.split([p.numel() for p in params]))]
        eps, shifted = 1e-4, []
        for sign in (1, -1):
            with torch.no_grad():
                torch._foreach_add_(params, steps, alpha=sign * eps)
            shifted.append(_flat_grad(model, params, windows))
            with torch.no_grad():
                torch._foreach_add_(params, steps, alpha=-sign * eps)
        torch.testing.assert_close((shifted[0] - shifted[1]) / (2 * eps), hessian @ v, rtol=1e-3, atol=1e-4)

    diag = hessian.diagonal()
    off_sq = (hessian ** 2).sum(1) - diag ** 2  # M * sigma_i^2: variance of one probe's z*Hz
    probes, mse = [16, 64, 256, 1024], []
    for m in probes:
        result = compute_scores(model, targets, windows, ["hutchinson_diag"], batch_size=4, seed=7,
                                probes=m, progress=False)["hutchinson_diag"]
        h = torch.cat([result.stat[t.name].flatten() for t in targets]).double()
        mse.append(float(((h - diag) ** 2).mean()))
        if m == 64:
            sigma = (off_sq / m).sqrt()
            z = (h - diag).abs() / (sigma + 1e-6 * diag.abs().max())
            assert z.max() < 4, f"worst entry {float(z.max()):.2f} standard errors from the exact diagonal"

    slope = np.polyfit(np.log(probes), np.log(mse), 1)[0]
    assert -1.3 < slope < -0.7, f"MSE {mse} falls with slope {slope:.2f}, expected about -1"
    for m, value in zip(probes, mse):  # and at the predicted level mean_i sum_{j!=i} H_ij^2 / M
        assert 0.5 < value / float(off_sq.mean() / m) < 2


def test_seed_fixes_the_probes(tiny_llama, tiny_windows):
    targets = find_targets(tiny_llama)

    def stat(seed):
        return compute_scores(tiny_llama, targets, tiny_windows, ["hutchinson_diag"], batch_size=3,
                              seed=seed, probes=2, progress=False)["hutchinson_diag"].stat

    first, again, other = stat(0), stat(0), stat(1)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)


def test_request_errors(tiny_llama, tiny_windows):
    targets = find_targets(tiny_llama)
    with pytest.raises(ValueError, match="unknown metric 'fisher'; allowed: " + ", ".join(METRICS)):
        compute_scores(tiny_llama, targets, tiny_windows, ["fisher"], batch_size=2, seed=0)
    with pytest.raises(ValueError, match="unknown weighting"):
        compute_scores(tiny_llama, targets, tiny_windows, ["grad_squared"], batch_size=2, seed=0,
                       weighting="squared")


def test_bf16_model_gives_fp32_results(tiny_windows):
    model = make_tiny_llama(dtype=torch.bfloat16)
    targets = find_targets(model)
    results = compute_scores(model, targets, tiny_windows, list(METRICS), batch_size=3, seed=0,
                             probes=2, progress=False)
    assert list(results) == list(METRICS)
    for metric, result in results.items():
        for t in targets:
            stat, score = result.stat[t.name], result.score[t.name]
            assert stat.dtype == score.dtype == torch.float32, metric
            assert stat.shape == score.shape == (t.rows, t.cols)
            assert torch.isfinite(score).all() and score.abs().sum() > 0, metric
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


GRADIENT_METRICS = ["grad_x_weight", "grad_squared", "hutchinson_diag"]


def _small_gradient_models():
    """The same weights in fp16 and fp32, the LM head scaled by 1e-3 so that the gradients are
    small (median |gbar| 3e-7, as deep in fp16's subnormal range as most of a real model's)."""
    import copy

    model = make_tiny_llama(layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e-3)
    half = copy.deepcopy(model).half()
    return half, copy.deepcopy(half).float()


def _relative_error(result, reference, metric):
    stat, ref = result[metric].stat, reference[metric].stat
    return (sum((stat[k] - ref[k]).abs().sum() for k in ref) / sum(ref[k].abs().sum() for k in ref)).item()


def test_fp16_gradients_are_loss_scaled(monkeypatch):
    """Without loss scaling fp16 loses 3.5-4.5% of these statistics (measured; and zeroes hundreds
    of weights' gradients); scaled by 2^16 and divided back in fp32 they are within 0.1% of fp32's."""
    half, full = _small_gradient_models()
    windows = unigram_text(4, seed=3, length=32)

    def run(model):
        return compute_scores(model, find_targets(model), windows, GRADIENT_METRICS, 2, 0, probes=2, progress=False)

    reference, scaled = run(full), run(half)
    monkeypatch.setattr(gradient_pass, "FP16_LOSS_SCALE", 1.0)
    unscaled = run(half)
    assert "loss_scale" not in reference["grad_x_weight"].extra
    for metric in GRADIENT_METRICS:
        assert scaled[metric].extra["loss_scale"] == 2.0**16
        assert _relative_error(scaled, reference, metric) < 1e-3
        assert _relative_error(unscaled, reference, metric) > 0.03
    zeros = sum(int((stat == 0).sum()) for stat in unscaled["grad_x_weight"].stat.values())
    assert zeros > 100 and all(bool((stat != 0).all()) for stat in scaled["grad_x_weight"].stat.values())


def test_fp16_loss_scale_halves_until_finite(monkeypatch):
    """Started at 2^40 the gradients overflow; the scale halves until they and the Hessian-vector
    products are finite, and the result is the run started at that scale, bit for bit."""
    half, _ = _small_gradient_models()
    windows = unigram_text(4, seed=3, length=32)

    def run(start):
        monkeypatch.setattr(gradient_pass, "FP16_LOSS_SCALE", start)
        return compute_scores(half, find_targets(half), windows, GRADIENT_METRICS, 2, 0, probes=2, progress=False)

    halved = run(2.0**40)
    settled = halved["grad_x_weight"].extra["loss_scale"]
    assert 2.0**16 < settled < 2.0**40
    direct = run(settled)
    for metric in GRADIENT_METRICS:
        assert direct[metric].extra["loss_scale"] == settled
        for name, stat in halved[metric].stat.items():
            assert torch.isfinite(stat).all() and torch.equal(stat, direct[metric].stat[name]), (metric, name)



def test_an_overflowing_hessian_vector_product_halves_the_scale_and_retakes_it(monkeypatch):
    """The first Hessian-vector product reports an fp16 overflow: the scale halves, the graph is
    rebuilt (with grad enabled, although the metric consumes the products under no_grad) and the
    result is the run started at the halved scale, bit for bit."""
    half, _ = _small_gradient_models()
    windows = unigram_text(4, seed=3, length=32)
    finite, calls = gradient_pass._finite, []

    def first_product_overflows(tensors):
        calls.append(1)
        return len(calls) != 2 and finite(tensors)  # call 1: the first gradients; 2: their product

    def run(start):
        monkeypatch.setattr(gradient_pass, "FP16_LOSS_SCALE", start)
        return compute_scores(half, find_targets(half), windows, ["hutchinson_diag"], 2, 0, probes=2,
                              progress=False)["hutchinson_diag"]

    direct = run(2.0**15)
    monkeypatch.setattr(gradient_pass, "_finite", first_product_overflows)
    halved = run(2.0**16)
    assert halved.extra["loss_scale"] == direct.extra["loss_scale"] == 2.0**15
    for name, stat in halved.stat.items():
        assert torch.isfinite(stat).all() and torch.equal(stat, direct.stat[name]), name
