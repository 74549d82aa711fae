"""Perplexity against an independent reference loop; chunked and unchunked loss agree."""

import math

import numpy as np
import pytest
import torch

from conftest import make_tiny_llama
from esa.evaluation import evaluate, mean_token_loss, window_nll


def reference_nll(model, windows):
    """Summed NLL per window from the model's full logits, in float64, one window at a time."""
    out = []
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            out.append(-logp.gather(1, window[1:, None]).sum().item())
    return np.array(out)


def test_ppl_equals_reference_loop(tiny_llama, tiny_windows):
    result = evaluate(tiny_llama, tiny_windows, batch_size=4, chunk_size=5)
    ref = reference_nll(tiny_llama, tiny_windows)
    T = tiny_windows.shape[1]
    ref_ppl = math.exp(ref.sum() / (len(ref) * (T - 1)))
    assert result.tokens.tolist() == [T - 1] * len(ref)
    assert abs(result.ppl - ref_ppl) / ref_ppl < 1e-5
    np.testing.assert_allclose(result.nll, ref, rtol=1e-5)
    assert result.metrics()["windows"] == 6 and result.metrics()["tokens"] == 6 * (T - 1)
    assert result.finite


def test_chunked_equals_unchunked_loss_and_gradient(tiny_llama, tiny_windows):
    whole = mean_token_loss(tiny_llama, tiny_windows, chunk_size=10_000)
    whole.backward()
    grad_whole = [p.grad.clone() for p in tiny_llama.parameters()]
    tiny_llama.zero_grad()
    chunked = mean_token_loss(tiny_llama, tiny_windows, chunk_size=3)
    chunked.backward()
    assert torch.allclose(whole, chunked, rtol=1e-6)
    for a, p in zip(grad_whole, tiny_llama.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


def test_padding_is_not_predicted(tiny_llama, tiny_windows):
    """A window padded on the right counts only its real tokens."""
    mask = torch.ones_like(tiny_windows)
    mask[0, 8:] = 0
    nll, tokens = window_nll(tiny_llama, tiny_windows, attention_mask=mask)
    assert tokens.tolist() == [7, 11, 11, 11, 11, 11]
    short, short_tokens = window_nll(tiny_llama, tiny_windows[:1, :8])
    assert short_tokens.item() == 7
    torch.testing.assert_close(nll[0], short[0], rtol=1e-5, atol=1e-5)


def test_batch_size_does_not_change_result(tiny_llama, tiny_windows):
    a = evaluate(tiny_llama, tiny_windows, batch_size=1)
    b = evaluate(tiny_llama, tiny_windows, batch_size=6)
    np.testing.assert_allclose(a.nll, b.nll, rtol=1e-5)
    assert a.stderr == np.std(a.nll / a.tokens, ddof=1) / math.sqrt(6)


# Real vocabulary sizes: a 64-class head cannot show a loss that drifts at 49k or 262k classes.
GEMMA3_VOCAB = 262_144


def reference_window_nll(model, windows):
    """Summed NLL per window: float64 log-softmax over the model's own (fp32 / bf16) logits."""
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits[:, :-1].double(), dim=-1)
    return -logp.gather(-1, windows[:, 1:, None]).squeeze(-1).sum(dim=1).numpy()


@pytest.fixture(scope="module")
def real_vocab_llama():
    """A tiny Llama body under a Gemma-3-size head (262,144 classes), logits of a trained
    model's spread (std ~4; at random init they are ~0.1, near-uniform, where fp32 is exact)."""
    model = make_tiny_llama(seed=3, vocab=GEMMA3_VOCAB)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    return model


@pytest.fixture(scope="module")
def real_vocab_windows():
    generator = torch.Generator().manual_seed(4)
    return torch.randint(0, GEMMA3_VOCAB, (3, 25), generator=generator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [8, 7, 256])  # 24 predicted positions: divides, does not, one chunk
def test_window_nll_is_exact_at_262k_classes(real_vocab_llama, real_vocab_windows, one_thread, dtype, chunk):
    model = real_vocab_llama.to(dtype)
    try:
        ref = reference_window_nll(model, real_vocab_windows)
        with torch.no_grad():
            nll, tokens = window_nll(model, real_vocab_windows, chunk_size=chunk)
    finally:
        real_vocab_llama.float()
    assert tokens.tolist() == [24, 24, 24]
    np.testing.assert_allclose(nll.numpy(), ref, rtol=1e-6, atol=0)


def test_calibration_loss_of_every_gradient_metric_is_exact_at_262k_classes(
        real_vocab_llama, real_vocab_windows, one_thread, monkeypatch):
    """The loss grad_x_weight, grad_squared and hutchinson_diag differentiate (mean token NLL
    of each calibration window, where a second-order metric takes its batch one window at a
    time, under autograd and the math-attention context) is float64-exact."""
    from esa.metrics import gradient_pass
    from esa.scores import compute_scores
    from esa.targets import find_targets

    seen = []

    def spy(model, batch, chunk_size):
        loss = mean_token_loss(model, batch, chunk_size=chunk_size)
        seen.append((batch.clone(), loss.item()))
        return loss

    monkeypatch.setattr(gradient_pass, "mean_token_loss", spy)
    targets = find_targets(real_vocab_llama)
    compute_scores(real_vocab_llama, targets, real_vocab_windows,
                   ["grad_x_weight", "grad_squared", "hutchinson_diag"], batch_size=2, seed=0,
                   probes=1, chunk_size=7, progress=False)
    assert [len(batch) for batch, _ in seen] == [1, 1, 1]
    for batch, loss in seen:
        ref = reference_window_nll(real_vocab_llama, batch).sum() / (batch.shape[0] * 24)
        assert abs(loss - ref) / ref < 1e-6


def test_bundled_model_window_nll_is_exact(bundled_checkpoint):
    """The bundled SmolLM2 (49,152 classes) on two 256-token evaluation-like windows."""
    from esa.models import load_model, load_tokenizer
    from esa.data import load_documents, make_windows

    model = load_model(bundled_checkpoint, "cpu", "fp32", "sdpa")
    _, eval_docs = load_documents("builtin:pydoc")
    windows = torch.from_numpy(make_windows(load_tokenizer(bundled_checkpoint), eval_docs, 256)[:2]).long()
    ref = reference_window_nll(model, windows)
    for chunk in (85, 256):  # 255 predicted positions: 85 divides them, 256 is the default
        with torch.no_grad():
            nll, _ = window_nll(model, windows, chunk_size=chunk)
        np.testing.assert_allclose(nll.numpy(), ref, rtol=1e-6, atol=0)
