"""Perplexity against an independent reference loop; chunked and unchunked loss agree."""

import math

import numpy as np
import torch

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
