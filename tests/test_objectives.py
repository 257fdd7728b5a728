"""The loss terms' own gradients agree with PyTorch's log-softmax and KL divergence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tl_privacy import objectives
from tl_privacy.objectives import logsumexp_float32, row_log_probs

N_ROWS, VOCAB = 21, 37  # 21 rows: two full chunks of 8 and a partial one


def _rows(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(N_ROWS, VOCAB, generator=generator)).to(dtype).requires_grad_()


def _reference_log_probs(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.log_softmax(3 * torch.randn(N_ROWS, VOCAB, generator=generator), dim=-1)


def _kl(rows: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return objectives._KLFromReference.apply(rows, reference).sum() / len(rows)


def test_row_log_probs_in_float64():
    rows = _rows(torch.float64)
    targets = torch.randint(0, VOCAB, (N_ROWS,), generator=torch.Generator().manual_seed(2))
    weights = torch.linspace(-1.0, 2.0, N_ROWS, dtype=torch.float64)

    ours = row_log_probs(rows, targets)
    (gradient,) = torch.autograd.grad((ours * weights).sum(), rows)
    theirs = F.log_softmax(rows, dim=-1).gather(1, targets[:, None]).squeeze(1)
    (expected,) = torch.autograd.grad((theirs * weights).sum(), rows)

    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(gradient, expected)
    assert torch.autograd.gradcheck(lambda x: row_log_probs(x, targets), (rows,))


def test_row_log_probs_of_bfloat16_rows():
    rows = _rows(torch.bfloat16)
    targets = torch.arange(N_ROWS) % VOCAB

    ours = row_log_probs(rows, targets)
    ours.sum().backward()
    theirs = F.log_softmax(rows.detach().float(), dim=-1).gather(1, targets[:, None]).squeeze(1)

    assert ours.dtype == torch.float32
    assert rows.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    expected = F.one_hot(targets, VOCAB) - F.softmax(rows.detach().float(), dim=-1)
    torch.testing.assert_close(rows.grad.float(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    ("rows_dtype", "reference_dtype"),
    [
        (torch.float64, torch.float64),
        # ReferenceCache keeps the reference in float16, so it need not sum to exactly 1.
        (torch.float32, torch.float16),
    ],
)
def test_kl_matches_kl_div(rows_dtype, reference_dtype):
    rows = _rows(rows_dtype)
    reference = _reference_log_probs().to(reference_dtype)

    ours = _kl(rows, reference)
    (gradient,) = torch.autograd.grad(ours, rows)
    theirs = F.kl_div(
        F.log_softmax(rows, dim=-1),
        reference.to(rows_dtype),
        log_target=True,
        reduction="batchmean",
    )
    (expected,) = torch.autograd.grad(theirs, rows)

    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(gradient, expected)
    if rows_dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x: _kl(x, reference), (rows,))


def test_kl_with_impossible_tokens():
    rows = _rows(torch.float32)
    reference = _reference_log_probs()
    reference[:, 0] = -torch.inf
    reference = reference - reference.logsumexp(-1, keepdim=True)

    value = _kl(rows, reference)
    (gradient,) = torch.autograd.grad(value, rows)

    finite = reference[:, 1:]
    expected = F.kl_div(
        F.log_softmax(rows, dim=-1)[:, 1:], finite, log_target=True, reduction="batchmean"
    )
    assert torch.isfinite(value)
    assert torch.isfinite(gradient).all()
    # The impossible token adds nothing to the value; the others' terms are unchanged.
    torch.testing.assert_close(value, expected)


def test_keep_loss_rejects_misshaped_reference():
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "pii_mask": torch.zeros(1, 4, dtype=torch.long),
    }
    rows = _rows(torch.float32)[:3]

    with pytest.raises(ValueError, match=r"shape \(2, 37\).*\(3, 37\)"):
        objectives.keep_loss_from_rows(rows, batch, "kl", _reference_log_probs()[:2])


def test_logsumexp_float32_of_bfloat16_rows():
    rows = _rows(torch.bfloat16).detach()

    value = logsumexp_float32(rows)

    assert value.dtype == torch.float32
    torch.testing.assert_close(value, rows.float().logsumexp(-1))


@pytest.mark.parametrize("form", ["sequence", "unlikelihood", "capped_ce"])
def test_pii_suppression_of_float64_rows(form):
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5, 6]]),
        "attention_mask": torch.ones(1, 6, dtype=torch.long),
        "pii_mask": torch.tensor([[0, 0, 1, 1, 0, 1]]),
    }
    rows = _rows(torch.float64)[:3].detach().requires_grad_()  # one row per PII token

    value = objectives.pii_suppression_from_rows(rows, batch, form)
    value.backward()

    assert value.dtype == torch.float64
    assert torch.isfinite(rows.grad).all()
