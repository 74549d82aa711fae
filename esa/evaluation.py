"""Token negative log-likelihood and perplexity of a causal LM on fixed windows.

For a window x_1..x_T the model predicts x_2..x_T, so it contributes T-1 predicted
tokens (padding, where an attention mask marks it, is not predicted and not counted):

    NLL(window) = - sum_{t=2..T} log p(x_t | x_<t)
    loss        = sum_windows NLL / sum_windows (T-1)        (mean token NLL)
    PPL         = exp(loss)

The logits of a large vocabulary at batch x seq_len are gigabytes, so the LM head and the
cross-entropy run over chunks of positions; under autograd each chunk is recomputed
(:mod:`esa.recompute`) in backward, and in the double backward of a Hessian-vector product,
instead of kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from .precision import autocast
from .recompute import recomputed

DEFAULT_CHUNK = 256


def _logits(head, softcap: float | None, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's logits in at least fp32 (float64 stays float64), soft-capped where the
    family caps them.

    The positions go through the head as the rows of one matrix: given a chunk whose rows no
    view makes a matrix, and a head weight that does not require grad (scoring, where only the
    targets do), ``torch.matmul`` would run a batched product on a contiguous copy of the whole
    weight (1.05 GB at Llama-3.1-8B's), in every chunk's forward and backward. The bits are the
    batched product's (measured on CPU in fp32, bf16 and fp16)."""
    logits = head(hidden.reshape(-1, hidden.shape[-1])).unflatten(0, hidden.shape[:-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def _nll_of_logits(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Summed NLL per window (float64) of one chunk's logits (:func:`_head_nll`)."""
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    nll = torch.logsumexp(logits, dim=-1) - target_logit
    return (nll.double() * valid).sum(dim=1)


def _head_nll(head: torch.nn.Module, softcap: float | None, hidden: torch.Tensor,
              targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Summed NLL per window (float64) of one chunk of positions.

    Per position, NLL = logsumexp_v(z_v) - z_target over the class dimension laid out last
    (the logits z in at least fp32, float64 stays float64); the positions are summed in
    float64. ``F.cross_entropy`` on a [B, V, T] layout is ~10x less accurate in fp32 on CPU
    (1e-5 relative at 262k classes); this is within ~1e-8 of a float64 log-softmax.
    """
    return _nll_of_logits(_logits(head, softcap, hidden), targets, valid)


# float64 elements per block of the KL's work. On a CPU 2 MB a copy, so that the block's
# passes run in the core's cache, not in memory (measured, bench/bench_kl.py: the same bits as
# blocks of 2**25, 4x faster); on a GPU 268 MB a copy: memory is the bound there, and small
# blocks would be kernel launches.
KL_BLOCK_ELEMENTS = {"cpu": 2**18, "cuda": 2**25}


def _block_rows(classes: int, device: torch.device) -> int:
    """Positions per block of the float64 work (``KL_BLOCK_ELEMENTS``, at least one)."""
    return max(1, KL_BLOCK_ELEMENTS.get(device.type, KL_BLOCK_ELEMENTS["cuda"]) // classes)


def log_normaliser(logits: torch.Tensor) -> torch.Tensor:
    """``A = logsumexp_v a_v`` at every position, in float64 from the (at least fp32) logits,
    the class dimension last; worked through in blocks of positions (a per-position result)."""
    classes = logits.shape[-1]
    flat = logits.reshape(-1, classes)
    rows = _block_rows(classes, flat.device)
    out = torch.empty(flat.shape[0], dtype=torch.float64, device=flat.device)
    for start in range(0, flat.shape[0], rows):
        out[start:start + rows] = torch.logsumexp(flat[start:start + rows].double(), dim=-1)
    return out.reshape(logits.shape[:-1])


def _kl_per_position(reference: torch.Tensor, logits: torch.Tensor, reference_normaliser: torch.Tensor) -> torch.Tensor:
    """KL(p || q) at every position (float64) from the reference's logits a, its log-normaliser
    A (:func:`log_normaliser`, taken once in the reference pass) and the model's logits b, the
    class dimension last. With B = logsumexp_v b_v and p_v = exp(a_v - A),
    log p_v - log q_v = (a_v - b_v) - (A - B), so, as sum_v p_v = 1,

        KL(p || q) = sum_v p_v (a_v - b_v) - (A - B),

    in float64 from the (at least fp32) logits: one log-normaliser, one exp, one dot product
    per evaluation (within 1e-13 nats of two log-softmaxes, and 0 exactly for equal logits).
    Finite logits give a finite KL. The positions of every window are worked through together
    in blocks of at most ``KL_BLOCK_ELEMENTS`` float64 elements of the device (at least one
    position): a per-position result, so the blocks change no bit of it."""
    positions, classes = reference.shape[:-1], reference.shape[-1]
    reference, logits = reference.reshape(-1, classes), logits.reshape(-1, classes)
    normaliser = reference_normaliser.reshape(-1, 1)
    rows = _block_rows(classes, reference.device)
    kl = torch.empty(reference.shape[0], dtype=torch.float64, device=reference.device)
    for start in range(0, reference.shape[0], rows):
        a, b = reference[start:start + rows].double(), logits[start:start + rows].double()
        A = normaliser[start:start + rows]
        gap = (A - torch.logsumexp(b, dim=-1, keepdim=True)).squeeze(-1)
        difference = b.neg_().add_(a)  # a - b, in b's storage
        p = a.sub_(A).exp_()  # in a's storage
        kl[start:start + rows] = torch.linalg.vecdot(p, difference) - gap
    return kl.reshape(positions)


@dataclass(frozen=True)
class Reference:
    """The unmodified model's side of one batch's KL and top-1 agreement: its final hidden
    states [B, T, d], and per predicted position [B, T - 1] its float64 log-normaliser and its
    top-1 class, taken once in the reference pass (:func:`reference_pass`) instead of in every
    edit's evaluation; and, where they were kept, its logits, one tensor per chunk of positions
    (else each evaluation recomputes them from the hidden states: one LM-head product more)."""

    hidden: torch.Tensor
    log_normaliser: torch.Tensor
    top1: torch.Tensor
    logits: tuple[torch.Tensor, ...] | None = None


def _head_divergence(head, reference_head, softcap: float | None, hidden: torch.Tensor,
                     reference: Reference, targets: torch.Tensor,
                     valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed NLL, KL divergence and top-1 agreements per window (float64) of one chunk
    (``reference``: the chunk's positions of the reference, its logits the chunk's if kept).

    With q the model's and p the reference's next-token distribution at a position
    (log-softmax of the logits),

        KL(p || q) = sum_v p_v (log p_v - log q_v),   agree = [argmax_v p_v == argmax_v q_v],

    each summed over the chunk's predicted positions; the NLL is :func:`_head_nll`'s, bit for
    bit, so an unchanged model scores exactly its baseline. The KL is taken in float64 from the
    (at least fp32) logits (:func:`_kl_per_position`): in fp32 the rounding (~1e-7 of each
    log-probability) swamps a small KL at a real vocabulary (measured at 49,152 classes: 8x
    too large at a true 6e-9 nats per position, 12% off at 7e-7). Peak
    memory: the two chunks' fp32 logits and a few float64 blocks (:func:`_kl_per_position`).
    """
    logits = _logits(head, softcap, hidden)
    nll = _nll_of_logits(logits, targets, valid)
    agree = (reference.top1 == logits.argmax(dim=-1)).to(torch.float64)
    reference_logits = reference.logits[0] if reference.logits else _logits(reference_head, softcap, reference.hidden)
    kl = _kl_per_position(reference_logits, logits, reference.log_normaliser)
    return nll, *((term.double() * valid).sum(dim=1) for term in (kl, agree))


def decoder_hidden(model: torch.nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The final hidden states (the LM head's input) of a batch of windows, the decoder run in
    the model's mixed precision (:mod:`esa.precision`), returned in the LM head's dtype."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with autocast(model):
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden.to(model.get_output_embeddings().weight.dtype)


def _shifted(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """Targets (token t+1 of each position t) and their validity (float64): a target counts only
    when both it and its context position are unmasked."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return input_ids[:, 1:], (attention_mask[:, 1:] * attention_mask[:, :-1]).to(torch.float64)


def window_nll(model: torch.nn.Module, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None,
               chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (float64, differentiable) and predicted-token count of each window.

    Returns ``(nll[B], tokens[B])``. Position t's hidden state predicts token t+1; a target
    counts only when both it and its context position are unmasked.
    """
    return hidden_nll(model, decoder_hidden(model, input_ids, attention_mask), input_ids, attention_mask,
                      chunk_size)


def hidden_nll(model: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None,
               chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`window_nll` from the windows' final hidden states (:func:`decoder_hidden`)."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    targets, valid = _shifted(input_ids, attention_mask)
    total = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=input_ids.device)
    for start in range(0, targets.shape[1], chunk_size):
        end = min(start + chunk_size, targets.shape[1])
        args = (hidden[:, start:end], targets[:, start:end], valid[:, start:end])
        if torch.is_grad_enabled() and hidden.requires_grad:
            part = recomputed(partial(_head_nll, head, softcap), args, list(head.parameters()))
        else:
            part = _head_nll(head, softcap, *args)
        total = total + part
    return total, valid.sum(dim=1)


@torch.no_grad()
def reference_pass(model: torch.nn.Module, input_ids: torch.Tensor, chunk_size: int = DEFAULT_CHUNK,
                   keep_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor, Reference]:
    """The unmodified model on a batch of windows: :func:`window_nll`'s ``(nll, tokens)``, bit
    for bit, and the :class:`Reference` its edits are measured against, from one pass of the
    LM head (its logits kept with it when ``keep_logits``: the same bits an evaluation would
    recompute, as the chunks have the same shapes)."""
    hidden = decoder_hidden(model, input_ids)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    targets, valid = _shifted(input_ids, None)
    total = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=input_ids.device)
    normalisers, top1, kept = [], [], []
    for start in range(0, targets.shape[1], chunk_size):
        end = min(start + chunk_size, targets.shape[1])
        logits = _logits(head, softcap, hidden[:, start:end])
        total = total + _nll_of_logits(logits, targets[:, start:end], valid[:, start:end])
        normalisers.append(log_normaliser(logits))
        top1.append(logits.argmax(dim=-1))
        if keep_logits:
            kept.append(logits)
    return total, valid.sum(dim=1), Reference(hidden, torch.cat(normalisers, dim=1), torch.cat(top1, dim=1),
                                              tuple(kept) or None)


@torch.no_grad()
def window_divergence(model: torch.nn.Module, input_ids: torch.Tensor, reference: Reference,
                      reference_head, chunk_size: int = DEFAULT_CHUNK):
    """Per window of a batch: summed NLL, predicted tokens, summed KL(reference || model) and
    top-1 agreements (see :func:`_head_divergence`) against the same windows' ``reference``
    (:func:`reference_pass`); ``reference_head`` is the reference model's LM head."""
    hidden = decoder_hidden(model, input_ids)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    targets, valid = _shifted(input_ids, None)
    sums = [torch.zeros(input_ids.shape[0], dtype=torch.float64, device=input_ids.device) for _ in range(3)]
    for number, start in enumerate(range(0, targets.shape[1], chunk_size)):
        end = min(start + chunk_size, targets.shape[1])
        chunk = Reference(reference.hidden[:, start:end].to(hidden.device),
                          reference.log_normaliser[:, start:end].to(hidden.device),
                          reference.top1[:, start:end].to(hidden.device),
                          (reference.logits[number].to(hidden.device),) if reference.logits else None)
        parts = _head_divergence(head, reference_head, softcap, hidden[:, start:end], chunk,
                                 targets[:, start:end], valid[:, start:end])
        sums = [total + part for total, part in zip(sums, parts)]
    nll, kl, agree = sums
    return nll, valid.sum(dim=1), kl, agree


def mean_token_loss(model: torch.nn.Module, input_ids: torch.Tensor,
                    chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``L_b``: mean token NLL of one batch of windows (differentiable scalar)."""
    nll, tokens = window_nll(model, input_ids, chunk_size=chunk_size)
    return nll.sum() / tokens.sum()


@dataclass(frozen=True)
class Evaluation:
    """Per-window NLL sums and token counts, and the aggregate metrics they define."""

    nll: np.ndarray  # float64 [W], summed NLL of each window
    tokens: np.ndarray  # int64 [W], predicted tokens of each window
    kl: np.ndarray | None = None  # float64 [W], summed KL(reference || model), against a reference
    agree: np.ndarray | None = None  # float64 [W], positions whose top-1 token matches the reference's

    @property
    def loss(self) -> float:
        return float(self.nll.sum() / self.tokens.sum())

    @property
    def ppl(self) -> float:
        """exp(loss); inf when that overflows or the loss is NaN (a destroyed model is a
        result, not a crash, and ranks as maximal damage)."""
        if math.isnan(self.loss):
            return float("inf")
        try:
            return math.exp(self.loss)
        except OverflowError:
            return float("inf")

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.nll).all())

    @property
    def window_loss(self) -> np.ndarray:
        return self.nll / self.tokens

    @property
    def stderr(self) -> float:
        """Standard error of the mean per-window loss."""
        per = self.window_loss
        return float(per.std(ddof=1) / math.sqrt(len(per))) if len(per) > 1 else 0.0

    @property
    def mean_kl(self) -> float:
        """Mean KL(reference || model) per predicted token (NaN without a reference)."""
        return math.nan if self.kl is None else float(self.kl.sum() / self.tokens.sum())

    @property
    def top1(self) -> float:
        """Share of predicted positions whose top-1 token is the reference's (NaN without one)."""
        return math.nan if self.agree is None else float(self.agree.sum() / self.tokens.sum())

    def metrics(self) -> dict:
        return {"loss": self.loss, "ppl": self.ppl, "tokens": int(self.tokens.sum()),
                "windows": int(len(self.nll)), "finite": self.finite,
                "loss_stderr": self.stderr}


def batches(windows: torch.Tensor, batch_size: int):
    """Consecutive batches of rows of a [W, T] window tensor."""
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start:start + batch_size]


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, batch_size: int,
             chunk_size: int = DEFAULT_CHUNK, progress: bool = False, desc: str = "eval") -> Evaluation:
    """Evaluate ``model`` on a [W, T] tensor of token windows (on the model's device)."""
    device = model.get_input_embeddings().weight.device  # the first shard under device_map
    nll, tokens = [], []
    for batch in tqdm(list(batches(windows, batch_size)), desc=desc, disable=not progress, leave=False):
        n, t = window_nll(model, batch.to(device), chunk_size=chunk_size)
        nll.append(n.double().cpu())
        tokens.append(t.long().cpu())
    return Evaluation(torch.cat(nll).numpy(), torch.cat(tokens).numpy())
