"""The damage measure: KL and top-1 against brute force (tiny model and a real-size head), the paired
bootstrap interval against a hand-computed case, and an unchanged model at exactly zero damage."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_llama, unigram_text

from esa.damage import Baseline, Bootstrap, DamageMeter, paired_interval
from esa import evaluation
from esa.allocator import tracked_peak
from esa.evaluation import Evaluation, Reference, _head_divergence, _logits, evaluate, log_normaliser
from esa.perturb import perturbed


def _brute_force(model, reference_logits, windows):
    """Mean KL(reference || model) per predicted token and top-1 agreement, float64 from full logits."""
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].double()
    log_p = torch.log_softmax(reference_logits[:, :-1].double(), -1)
    log_q = torch.log_softmax(logits, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    agree = log_p.argmax(-1) == log_q.argmax(-1)
    return kl.mean().item(), agree.double().mean().item()


def test_kl_and_top1_equal_brute_force_even_when_the_head_itself_is_edited():
    """The reference keeps its own copy of the LM head: an edit of the (tied) head is measured
    against the unmodified head, not against itself."""
    model = make_tiny_llama(layers=2)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2
    windows = unigram_text(6, seed=2, length=16)
    with torch.no_grad():
        reference_logits = model(windows).logits
    meter = DamageMeter(model, windows, 4, Baseline.of(evaluate(model, windows, 4)))
    edit = pd.DataFrame({"tensor": ["lm_head.weight"] * 16 + ["model.layers.1.mlp.down_proj.weight"],
                         "flat_index": [*range(16), 5]})  # the whole row of token 0, and one MLP weight
    with perturbed(model, edit, "sign_flip", 30.0):
        measured = meter.measure()
        kl, top1 = _brute_force(model, reference_logits, windows)
    assert kl > 1e-3 and top1 < 1
    assert measured["kl"] == pytest.approx(kl, rel=1e-9, abs=0)
    assert measured["top1"] == top1  # 90 positions: a count, exact


def test_kept_reference_logits_give_the_bits_of_recomputed_ones(monkeypatch):
    """A meter whose reference logits fit REFERENCE_LOGITS_BUDGET keeps them (one LM-head product
    per evaluation fewer) and measures the same bits as one that recomputes them; over the
    budget it keeps none."""
    from esa import damage as damage_module

    model = make_tiny_llama(layers=2)
    windows = unigram_text(6, seed=2, length=16)
    baseline = Baseline.of(evaluate(model, windows, 4))
    edit = pd.DataFrame({"tensor": ["model.layers.1.mlp.down_proj.weight"] * 3, "flat_index": [5, 9, 40]})
    assert damage_module.reference_logits_bytes(model, windows) == 6 * 15 * 64 * 4
    measured = {}
    for budget in (6 * 15 * 64 * 4, 6 * 15 * 64 * 4 - 1):
        monkeypatch.setattr(damage_module, "REFERENCE_LOGITS_BUDGET", budget)
        meter = DamageMeter(model, windows, 4, baseline, chunk_size=8)
        kept = [reference.logits for reference in meter._references]
        with perturbed(model, edit, "sign_flip", 30.0):
            measured[budget] = meter.evaluate()
        assert all(k is not None and [c.shape[1] for c in k] == [8, 7] for k in kept) == (budget % 2 == 0)
        assert all(k is None for k in kept) == (budget % 2 == 1)
    kept_run, recomputed_run = measured.values()
    assert recomputed_run.mean_kl > 1e-6  # the edit is measured
    for field in ("nll", "kl", "agree"):
        assert np.array_equal(getattr(kept_run, field), getattr(recomputed_run, field)), field


@torch.no_grad()
def _reference(head, hidden) -> Reference:
    """The reference side of a chunk, as the meter's reference pass takes it."""
    logits = _logits(head, None, hidden)
    return Reference(hidden, log_normaliser(logits), logits.argmax(dim=-1))


def test_kl_is_exact_at_a_real_vocabulary():
    """49,152 classes (SmolLM2's): a KL of ~4e-7 nats per position is right to 1e-6 relative,
    against float64 from the same fp32 logits (fp32 log-softmax was 8x too large there)."""
    torch.manual_seed(0)
    vocab, hidden, positions = 49152, 64, 16
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.normal_(0, 0.3)
    reference = torch.randn(1, positions, hidden) * 3
    edited = reference + 3e-4 * torch.randn_like(reference)
    targets = torch.randint(0, vocab, (1, positions))
    _, kl, _ = _head_divergence(head, head, None, edited, _reference(head, reference), targets,
                                torch.ones(1, positions, dtype=torch.float64))
    with torch.no_grad():
        log_p = torch.log_softmax(head(reference).double(), -1)
        log_q = torch.log_softmax(head(edited).double(), -1)
    exact = (log_p.exp() * (log_p - log_q)).sum().item()
    assert 1e-7 < exact / positions < 1e-5
    assert kl.item() == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("classes", [49152, 262144])
def test_the_blocked_kl_equals_a_float64_log_softmax_from_1e_9_to_10_nats(classes):
    """At real vocabularies, per position, against one float64 log-softmax of the whole chunk:
    within 1e-7 relative or 1e-12 nats, whichever is larger, for true KLs from ~1e-9 to ~10."""
    torch.manual_seed(0)
    reference = 3 * torch.randn(2, 8, classes)
    for scale, low, high in ((4e-5, 1e-10, 1e-8), (1e-2, 1e-5, 1e-3), (1.0, 0.1, 1.0), (6.0, 5.0, 20.0)):
        logits = reference + scale * torch.randn_like(reference)
        log_p, log_q = torch.log_softmax(reference.double(), -1), torch.log_softmax(logits.double(), -1)
        exact = (log_p.exp() * (log_p - log_q)).sum(-1)
        assert low < exact.mean() < high, scale
        kl = evaluation._kl_per_position(reference, logits, log_normaliser(reference))
        assert kl.shape == (2, 8)
        assert ((kl - exact).abs() <= torch.clamp(1e-7 * exact.abs(), min=1e-12)).all(), scale


def test_the_kl_works_in_blocks_that_change_no_bit_and_bound_its_memory(monkeypatch):
    """A chunk's float64 KL work runs in blocks of positions: the same bits as one block, and at
    a real vocabulary its working memory falls from about three float64 copies of the chunk's
    logits (five before the logit-difference form) to the fp32 logits plus a few blocks."""
    torch.manual_seed(0)
    vocab, hidden, batch, positions = 49152, 64, 4, 64
    head = torch.nn.Linear(hidden, vocab, bias=False)
    reference = torch.randn(batch, positions, hidden)
    edited = reference + 0.1 * torch.randn_like(reference)
    args = (head, head, None, edited, _reference(head, reference), torch.randint(0, vocab, (batch, positions)),
            torch.ones(batch, positions, dtype=torch.float64))

    def run(block_elements):
        monkeypatch.setitem(evaluation.KL_BLOCK_ELEMENTS, "cpu", block_elements)
        with torch.no_grad():
            peak, _ = tracked_peak(lambda: results.append(_head_divergence(*args)))
        return peak

    results = []
    whole, blocked = run(2**40), run(batch * 8 * vocab)  # one block; blocks of 8 positions
    assert all(torch.equal(a, b) for a, b in zip(*results))
    logits_bytes = batch * positions * vocab * 4
    assert whole > 2 * logits_bytes + 2 * (2 * logits_bytes)  # two fp32 logits, >2 float64 copies
    assert blocked < 2 * logits_bytes + 6 * (2 * logits_bytes) * 8 / positions


def test_paired_interval_of_a_hand_computed_case():
    """Two windows of one token, NLL 2 and 4 against a baseline of 1 and 1: a resample is
    (0,0), (0,1), (1,0) or (1,1), so d_b is e^2 - e, e^3 - e or e^4 - e; over 1000 draws
    the 0.5% and 99.5% quantiles are the two extremes (P(no (0,0) in 1000) = 0.75^1000)."""
    tokens = np.array([1, 1])
    low, high = paired_interval(np.array([2.0, 4.0]), np.array([1.0, 1.0]), tokens, Bootstrap(1000, 0.99, 0))
    assert (low, high) == (math.exp(2) - math.e, math.exp(4) - math.e)
    # identical NLL: every resample's difference is exactly 0
    assert paired_interval(np.array([2.0, 4.0]), np.array([2.0, 4.0]), tokens, Bootstrap()) == (0.0, 0.0)
    # a destroyed window: PPL inf in every resample that draws it
    low, high = paired_interval(np.array([2.0, np.nan]), np.array([1.0, 1.0]), tokens, Bootstrap(1000, 0.99, 0))
    assert (low, high) == (math.exp(2) - math.e, math.inf)


def test_an_unchanged_model_has_zero_damage_and_edits_replay_bit_exactly():
    model = make_tiny_llama(layers=3)
    windows = unigram_text(6, seed=2, length=16)
    baseline = Baseline.of(evaluate(model, windows, 4))
    meter = DamageMeter(model, windows, 4, baseline, start_layers={0, 2})
    assert meter.reference.nll.tolist() == baseline.nll.tolist()
    unchanged = {"loss": baseline.loss, "ppl": baseline.ppl, "delta_loss": 0.0, "delta_ppl": 0.0, "ppl_ratio": 1.0,
                 "delta_ppl_lo": 0.0, "delta_ppl_hi": 0.0, "kl": 0.0, "top1": 1.0, "finite": True}
    assert meter.measure() == unchanged and meter.unchanged() == unchanged
    edit = pd.DataFrame({"tensor": "model.layers.2.mlp.down_proj.weight", "flat_index": [3, 50, 99]})
    with perturbed(model, edit, "sign_flip", 40.0):
        full = evaluate(model, windows, 4)
        from_layer_2, from_0 = meter.measure(2), meter.measure(0)
    assert from_layer_2 == from_0  # the replayed layers 0-1 are the unmodified ones, bit for bit
    assert from_0["loss"] == full.loss and from_0["delta_ppl"] == full.ppl - baseline.ppl
    assert from_0["delta_ppl_lo"] <= from_0["delta_ppl"] <= from_0["delta_ppl_hi"]


def test_deltas_are_against_the_baseline_given():
    """The baseline step's numbers are the reference of every delta (the meter warns, not
    fails, when its own unmodified pass differs, e.g. on another device)."""
    windows = unigram_text(4, seed=2, length=16)
    model = make_tiny_llama()
    truth = evaluate(model, windows, 4)
    shifted = Evaluation(truth.nll + 0.5, truth.tokens)
    meter = DamageMeter(model, windows, 4, Baseline.of(shifted))
    measured = meter.measure()
    assert measured["delta_loss"] == truth.loss - shifted.loss and measured["kl"] == 0.0
