"""Loss terms of the adversarial localization objective, shared by the learned masks and
the slimming baseline.

Position ``t`` of the logits predicts token ``t + 1``, so every term compares
``logits[:, :-1]`` with ``input_ids[:, 1:]`` and reads the labels of the
predicted token. Padding (``attention_mask == 0``) counts in no term.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

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
    """Log-probability (nats) of ``targets[i]`` under the logits ``rows[i]``, in float32."""
    log_probs = F.log_softmax(rows.float(), dim=-1)
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


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
        string_log_p = torch.zeros(int(run_ids.max()) + 1, device=rows.device)
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
        log_q = F.log_softmax(rows.float(), dim=-1)
        log_p = reference_log_probs.to(log_q.device, torch.float32)
        return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
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
