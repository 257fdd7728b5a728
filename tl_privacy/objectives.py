"""Loss terms of the adversarial localization objective, shared by the learned masks and
the slimming baseline.

Position ``t`` of the logits predicts token ``t + 1``, so every term compares
``logits[:, :-1]`` with ``input_ids[:, 1:]`` and reads the labels of the
predicted token. Padding (``attention_mask == 0``) counts in no term.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.autograd.function import once_differentiable

PIILossForm = Literal["sequence", "unlikelihood", "capped_ce"]
KeepLossForm = Literal["kl", "ce"]

MIN_ONE_MINUS_P = 1e-6
"""Floor of ``1 - p`` in the unlikelihood term, which caps it at -log(1e-6), about 13.8 nats."""

DEFAULT_CE_CAP = 10.0
"""Cap, in nats, of the PII cross-entropy that the ``capped_ce`` form maximises."""


def shifted_targets(
    batch: dict[str, Tensor],
) -> tuple[Int[Tensor, "batch pos_1"], Bool[Tensor, "batch pos_1"], Bool[Tensor, "batch pos_1"]]:
    """Return the predicted tokens and which of them are PII or other real tokens.

    The optional ``suppress_mask`` entry of a batch narrows the PII tokens to
    suppress (for example to one PII type); tokens of the other types are then in
    neither set, because they are PII but not targeted.

    Returns:
        ``(targets, pii_positions, keep_positions)``, each ``[batch, pos - 1]``: the
        token predicted at each position, whether it is a PII token to suppress,
        and whether it is a real non-PII token.
    """
    input_ids = batch["input_ids"]
    real = batch["attention_mask"][:, 1:].bool()
    any_pii = batch["pii_mask"][:, 1:].bool()
    suppress = batch.get("suppress_mask")
    pii = (any_pii if suppress is None else suppress[:, 1:].bool()) & real
    return input_ids[:, 1:], pii, real & ~any_pii


def token_log_probs(
    logits: Float[Tensor, "batch pos d_vocab"], targets: Int[Tensor, "batch pos_1"]
) -> Float[Tensor, "batch pos_1"]:
    """Log-probability (nats) of each target token under ``logits[:, :-1]``."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def selected_log_probs(
    logits: Float[Tensor, "batch pos d_vocab"],
    targets: Int[Tensor, "batch pos_1"],
    selected: Bool[Tensor, "batch pos_1"],
) -> Float[Tensor, " n_selected"]:
    """``token_log_probs(logits, targets)[selected]``, normalizing only the selected rows.

    The log-softmax over the vocabulary and its backward pass dominate the loss terms;
    PII tokens are a small part of a record, so this is several times cheaper there.
    """
    return row_log_probs(logits[:, :-1][selected], targets[selected])


def row_log_probs(
    rows: Float[Tensor, "n d_vocab"], targets: Int[Tensor, " n"]
) -> Float[Tensor, " n"]:
    """Log-probability (nats) of ``targets[i]`` under the logits ``rows[i]``, in float32
    (float64 for float64 rows).

    Equal to ``log_softmax(rows.float())`` gathered at ``targets``, but neither direction
    writes a float32 ``[n, d_vocab]`` tensor: see :class:`_TargetLogProb`.
    """
    return _TargetLogProb.apply(rows, targets)


def logsumexp_float32(rows: Float[Tensor, "n d_vocab"]) -> Float[Tensor, " n"]:
    """Row-wise log-sum-exp in float32 (float64 rows stay float64), converting
    ``CHUNK_ROWS`` rows at a time.

    Converting all bfloat16 rows to float32 at once writes ``n * d_vocab`` floats (400 MB
    for 2,048 SmolLM2 rows), while a few rows stay in the CPU's caches. In chunks of 16 rows,
    1,024 bfloat16 rows of SmolLM2's vocabulary took 39 ms against 52 ms, with the same result.
    """
    if rows.dtype in (torch.float32, torch.float64):
        return torch.logsumexp(rows, dim=-1)
    return torch.cat([chunk.float().logsumexp(-1) for chunk in rows.split(CHUNK_ROWS)])


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _wide(values: Tensor) -> Tensor:
    """Return ``values`` in float32, or in float64 when they are float64 already."""
    return values.to(_wide_dtype(values.dtype))


CHUNK_ROWS = 8
"""Rows per float32 chunk of the vocabulary-sized loss computations (1.5 MiB on SmolLM2)."""


class _TargetLogProb(torch.autograd.Function):
    """``log_softmax(rows)[i, targets[i]]`` in float32, from the rows' log-sum-exp.

    The autograd graph of ``log_softmax(rows.float()).gather(...)`` keeps a float32
    log-softmax of every row and runs several vocabulary-sized passes backward. Here the
    gradient ``g * (onehot(target) - softmax(rows))`` is written chunk by chunk, in the
    rows' dtype. On 396 bfloat16 rows of SmolLM2's vocabulary, with the heap settings of
    :func:`tl_privacy.allocator.keep_freed_memory`, the PII term's forward and backward
    pass took 35 ms against 50 ms.
    """

    @staticmethod
    def forward(ctx: Any, rows: Tensor, targets: Tensor) -> Tensor:
        lse = logsumexp_float32(rows)
        picked = _wide(rows.gather(1, targets.unsqueeze(1)).squeeze(1)) - lse
        ctx.save_for_backward(rows, targets, lse)
        return picked

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        rows, targets, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        grad = _wide(grad)
        grad_rows = torch.empty_like(rows)
        for start in range(0, len(rows), CHUNK_ROWS):
            part = slice(start, start + CHUNK_ROWS)
            g = grad[part].unsqueeze(1)
            probs = (_wide(rows[part]) - lse[part].unsqueeze(1)).exp_()
            probs.mul_(-g).scatter_add_(1, targets[part].unsqueeze(1), g)
            grad_rows[part] = probs
        return grad_rows, None


class _KLFromReference(torch.autograd.Function):
    """Per-row ``KL(p || softmax(rows))`` in float32 (float64 for float64 rows), with
    ``log p`` given as ``reference``.

    With ``m = sum(p)`` (1 up to the reference's rounding), the row's value is
    ``sum(p * log p) - sum(p * rows) + m * logsumexp(rows)`` and its gradient is
    ``m * softmax(rows) - p``. Both are computed chunk by chunk. On 339 bfloat16 rows of
    SmolLM2's vocabulary, with the heap settings of
    :func:`tl_privacy.allocator.keep_freed_memory`, forward and backward took 60 ms
    against 74 ms for ``F.kl_div`` on a float32 log-softmax.
    """

    @staticmethod
    def forward(ctx: Any, rows: Tensor, reference: Tensor) -> Tensor:
        dtype = _wide_dtype(rows.dtype)
        values = rows.new_empty(len(rows), dtype=dtype)
        lse = rows.new_empty(len(rows), dtype=dtype)
        mass = rows.new_empty(len(rows), dtype=dtype)
        for start in range(0, len(rows), CHUNK_ROWS):
            part = slice(start, start + CHUNK_ROWS)
            x = _wide(rows[part])
            log_p = _finite(reference[part].to(dtype))
            p = log_p.exp()
            lse[part] = x.logsumexp(-1)
            mass[part] = p.sum(-1)
            values[part] = (p * (log_p - x)).sum(-1) + mass[part] * lse[part]
        ctx.save_for_backward(rows, reference, lse, mass)
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        rows, reference, lse, mass = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        grad = grad.to(lse.dtype)
        grad_rows = torch.empty_like(rows)
        for start in range(0, len(rows), CHUNK_ROWS):
            part = slice(start, start + CHUNK_ROWS)
            q = (_wide(rows[part]) - lse[part].unsqueeze(1)).exp_()
            q.mul_(mass[part].unsqueeze(1)).sub_(_finite(reference[part].to(lse.dtype)).exp_())
            grad_rows[part] = q.mul_(grad[part].unsqueeze(1))
        return grad_rows, None


def _finite(log_p: Tensor) -> Tensor:
    # A reference of -inf (p = 0) would give 0 * inf = NaN in p * log p. The most negative
    # float gives p = 0 and a finite product instead.
    return log_p.clamp_min(torch.finfo(log_p.dtype).min)


def pii_suppression_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    batch: dict[str, Tensor],
    form: PIILossForm = "sequence",
    ce_cap: float = DEFAULT_CE_CAP,
) -> Float[Tensor, ""]:
    """Bounded loss that falls as the model's probability of the PII tokens falls.

    ``sequence`` is the mean of ``-log(1 - P(string))`` over PII strings (runs of
    consecutive PII tokens), where ``P(string)`` is the product of the tokens'
    probabilities; it rewards breaking any one token of a string, which is what
    stops exact extraction. ``unlikelihood`` is the mean of ``-log(1 - p)`` over
    PII tokens. In both, ``1 - p`` is floored at 1e-6, so the term is 0 when
    ``p = 0`` and at most about 13.8. ``capped_ce`` is the mean of
    ``-min(-log p, ce_cap)``, from ``-ce_cap`` to 0. All three stay finite however
    far the gates push, so the objective cannot run away.
    Returns 0 when the batch has no PII token.
    """
    _, pii, _ = shifted_targets(batch)
    return pii_suppression_from_rows(logits[:, :-1][pii], batch, form, ce_cap)


def pii_suppression_from_rows(
    rows: Float[Tensor, "n_pii d_vocab"],
    batch: dict[str, Tensor],
    form: PIILossForm = "sequence",
    ce_cap: float = DEFAULT_CE_CAP,
) -> Float[Tensor, ""]:
    """:func:`pii_suppression_loss` from the logits of the PII positions alone.

    ``rows`` is ``logits[:, :-1][pii]`` with ``pii`` from :func:`shifted_targets`, as
    :func:`tl_privacy.readout.predicting_logits` returns it without the full logits.
    """
    targets, pii, _ = shifted_targets(batch)
    if not pii.any():
        return rows.new_zeros(())
    log_p = row_log_probs(rows, targets[pii])
    if form == "sequence":
        # One term per PII string: log P(string) is the sum over its tokens.
        run_ids = pii_runs(pii)
        string_log_p = torch.zeros(int(run_ids.max()) + 1, device=rows.device, dtype=log_p.dtype)
        string_log_p = string_log_p.index_add(0, run_ids[pii], log_p)
        return _unlikelihood(string_log_p).mean()
    if form == "unlikelihood":
        return _unlikelihood(log_p).mean()
    if form == "capped_ce":
        return -(-log_p).clamp_max(ce_cap).mean()
    raise ValueError(f"pii_loss must be 'sequence', 'unlikelihood' or 'capped_ce', got {form!r}.")


def _unlikelihood(log_p: Tensor) -> Tensor:
    # log(1 - p) computed as log(-expm1(log p)) keeps precision when p is small.
    one_minus_p = (-torch.expm1(log_p)).clamp_min(MIN_ONE_MINUS_P)
    return -torch.log(one_minus_p)


def pii_runs(pii: Bool[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Number the runs of consecutive True positions in each row: 0, 1, 2, ... over the batch.

    Positions outside a run get the id of the previous run (or 0); read the ids only
    where ``pii`` is True.
    """
    starts = pii.clone()
    starts[:, 1:] &= ~pii[:, :-1]
    return (starts.flatten().long().cumsum(0) - 1).clamp_min(0).view_as(pii)


def keep_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    batch: dict[str, Tensor],
    form: KeepLossForm = "kl",
    reference_log_probs: Float[Tensor, "n_keep d_vocab"] | None = None,
) -> Float[Tensor, ""]:
    """Loss that keeps the model's predictions on real non-PII tokens.

    ``ce`` is the mean cross-entropy of the actual next tokens. ``kl`` is the mean
    ``KL(reference || masked)`` from the unmasked model's distribution, given as
    ``reference_log_probs`` at the keep positions (in the order of
    ``keep_positions.nonzero()``, see :func:`reference_log_probs`).
    Returns 0 when the batch has no such token.
    """
    _, _, keep = shifted_targets(batch)
    return keep_loss_from_rows(logits[:, :-1][keep], batch, form, reference_log_probs)


def keep_loss_from_rows(
    rows: Float[Tensor, "n_keep d_vocab"],
    batch: dict[str, Tensor],
    form: KeepLossForm = "kl",
    reference_log_probs: Float[Tensor, "n_keep d_vocab"] | None = None,
) -> Float[Tensor, ""]:
    """:func:`keep_loss` from the logits of the keep positions alone.

    ``rows`` is ``logits[:, :-1][keep]`` with ``keep`` from :func:`shifted_targets`, as
    :func:`tl_privacy.readout.predicting_logits` returns it without the full logits.
    """
    targets, _, keep = shifted_targets(batch)
    if not keep.any():
        return rows.new_zeros(())
    if form == "ce":
        return -row_log_probs(rows, targets[keep]).mean()
    if form == "kl":
        if reference_log_probs is None:
            raise ValueError("keep_loss form 'kl' needs reference_log_probs.")
        reference = reference_log_probs.to(rows.device)
        if reference.shape != rows.shape:
            raise ValueError(
                f"reference_log_probs has shape {tuple(reference.shape)}, but the keep "
                f"positions' logits have {tuple(rows.shape)}; compute it on the same batch."
            )
        return _KLFromReference.apply(rows, reference).sum() / len(rows)
    raise ValueError(f"keep_loss must be 'kl' or 'ce', got {form!r}.")


def reference_log_probs(
    logits: Float[Tensor, "batch pos d_vocab"], batch: dict[str, Tensor]
) -> Float[Tensor, "n_keep d_vocab"]:
    """Log-probabilities of the unmasked model at the keep positions, for the ``kl`` form."""
    _, _, keep = shifted_targets(batch)
    return F.log_softmax(logits[:, :-1][keep].float(), dim=-1)


def check_finite(value: Tensor, term: str) -> None:
    """Raise ``FloatingPointError`` naming ``term`` when ``value`` is NaN or infinite."""
    number = float(value.detach())
    if not math.isfinite(number):
        raise FloatingPointError(
            f"The {term} term of the localization loss is {number}; lower the learning rate "
            "or check the batch for empty or invalid labels."
        )
