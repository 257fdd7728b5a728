"""Logits at selected positions: equal to the full logits' rows, cheaper, and hook-safe."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests._memorized import make_tiny_model
from tl_privacy.hooks import attached, mlp_post_name, model_logits
from tl_privacy.readout import predicting_logits


class VocabOutputs(TorchDispatchMode):
    """Recorder of the operations whose output's last dimension is d_vocab: their names and
    the number of elements of the largest output."""

    def __init__(self, d_vocab: int) -> None:
        super().__init__()
        self.d_vocab = d_vocab
        self.largest = 0
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dim() and out.shape[-1] == self.d_vocab:
            self.largest = max(self.largest, out.numel())
            self.names.append(str(func))
        return out


class DoubledLogits(torch.nn.Module):
    """A model whose logits are twice its unembedding of the final residual stream."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.cfg = inner.cfg
        self.unembed = inner.unembed

    def forward(self, input_ids, return_type="logits", **kwargs):
        return 2 * self.inner(input_ids, return_type=return_type, **kwargs)


class UnembedsTwice(DoubledLogits):
    """A model that also unembeds a zero vector before its own pass (a logit lens)."""

    def forward(self, input_ids, return_type="logits", **kwargs):
        self.unembed(torch.zeros(1, 1, self.cfg.d_model))
        return self.inner(input_ids, return_type=return_type, **kwargs)


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(d_mlp=64, seed=0)


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 256, (4, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0
    first = torch.rand(4, 11, generator=generator) < 0.3
    second = ~first & (torch.rand(4, 11, generator=generator) < 0.5)
    return input_ids, attention_mask, [first, second]


def _gated(model, gate: torch.Tensor):
    hooks = [
        (mlp_post_name(layer), lambda activation, hook: activation * gate)
        for layer in range(model.cfg.n_layers)
    ]
    return attached(model, hooks)


def test_rows_match_full_logits(model, batch):
    input_ids, attention_mask, selections = batch
    gate = torch.ones(model.cfg.d_mlp, requires_grad=True)
    predicting_logits(model, input_ids, attention_mask, selections)  # the first call checks

    with _gated(model, gate):
        logits = model_logits(model, input_ids, attention_mask)
        expected = [logits[:, :-1][selection] for selection in selections]
        rows = predicting_logits(model, input_ids, attention_mask, selections)
    (expected_grad,) = torch.autograd.grad(sum(r.logsumexp(-1).sum() for r in expected), gate)
    (rows_grad,) = torch.autograd.grad(sum(r.logsumexp(-1).sum() for r in rows), gate)

    assert all(selection.any() for selection in selections)
    for row, full in zip(rows, expected, strict=True):
        assert row.shape == full.shape
        torch.testing.assert_close(row, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows_grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_no_output_spans_every_position(model):
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 256, (8, 40), generator=generator)
    selections = [torch.rand(8, 39, generator=generator) < 0.1]
    d_vocab, d_model = model.cfg.d_vocab, model.cfg.d_model
    predicting_logits(model, input_ids, None, selections)  # the first call checks

    with VocabOutputs(d_vocab) as rows_only:
        predicting_logits(model, input_ids, None, selections)
    with VocabOutputs(d_vocab) as full:
        model_logits(model, input_ids)

    # The unembedding matrix itself (d_model x d_vocab) may pass through as a view.
    assert rows_only.largest <= max(int(selections[0].sum()), d_model) * d_vocab
    assert full.largest == input_ids.numel() * d_vocab


def test_backward_fills_no_zero_logits(model, batch):
    # An index into the unembedding's output makes the backward pass fill a zero tensor
    # as large as the selected rows' logits and copy the gradient into it.
    input_ids, attention_mask, selections = batch
    gate = torch.ones(model.cfg.d_mlp, requires_grad=True)
    predicting_logits(model, input_ids, attention_mask, selections)  # the first call checks
    with _gated(model, gate):
        rows = predicting_logits(model, input_ids, attention_mask, selections)

    with VocabOutputs(model.cfg.d_vocab) as backward:
        torch.autograd.grad(sum(r.logsumexp(-1).sum() for r in rows), gate)

    scatters = ("select_backward", "slice_backward", "zero", "fill", "index_put", "scatter")
    assert backward.names
    assert not [name for name in backward.names if any(word in name for word in scatters)]


def test_unembedding_hook_still_fires(model, batch):
    input_ids, attention_mask, selections = batch
    calls = []
    handle = model.unembed.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        rows = predicting_logits(model, input_ids, attention_mask, selections)
    finally:
        handle.remove()
    logits = model_logits(model, input_ids, attention_mask)

    assert len(calls) == 1
    torch.testing.assert_close(rows[0], logits[:, :-1][selections[0]])


@pytest.mark.parametrize(
    ("wrapper", "scale"),
    [(DoubledLogits, 2), (UnembedsTwice, 1)],
    ids=["soft_capped", "unembeds_twice"],
)
def test_unusual_heads_read_in_full(model, batch, wrapper, scale):
    input_ids, attention_mask, selections = batch
    wrapped = wrapper(model)
    logits = model_logits(model, input_ids, attention_mask)

    for _ in range(2):  # the first call checks the model, the second reads the result
        rows = predicting_logits(wrapped, input_ids, attention_mask, selections)
        for row, selection in zip(rows, selections, strict=True):
            torch.testing.assert_close(row, scale * logits[:, :-1][selection])


def test_misshaped_selection_raises(model, batch):
    input_ids, attention_mask, _ = batch
    whole = torch.ones_like(input_ids, dtype=torch.bool)

    with pytest.raises(ValueError, match=r"selection has shape \(4, 12\)"):
        predicting_logits(model, input_ids, attention_mask, [whole])


def test_no_hook_left_behind(model, batch):
    input_ids, attention_mask, selections = batch
    before = {
        name: (len(module._forward_hooks), len(module._forward_pre_hooks))
        for name, module in model.named_modules()
    }

    predicting_logits(model, input_ids, attention_mask, selections)

    after = {
        name: (len(module._forward_hooks), len(module._forward_pre_hooks))
        for name, module in model.named_modules()
    }
    assert after == before


def test_model_hook_added_later_is_applied(model, batch):
    input_ids, attention_mask, selections = batch
    predicting_logits(model, input_ids, attention_mask, selections)  # the first call checks
    handle = model.register_forward_hook(lambda module, args, out: 2 * out)
    try:
        rows = predicting_logits(model, input_ids, attention_mask, selections)
        logits = model_logits(model, input_ids, attention_mask)
    finally:
        handle.remove()

    torch.testing.assert_close(rows[0], logits[:, :-1][selections[0]])
