"""Hook bookkeeping: our hooks leave no trace, the user's hooks are never touched."""

from __future__ import annotations

import pytest
import torch

from tests._memorized import make_tiny_model
from tl_privacy import HardConcreteMask, PrivacyNeurons, attached, check_model

POST = "blocks.0.mlp.hook_post"


@pytest.fixture()
def model():
    return make_tiny_model(d_mlp=64)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))


def hook_counts(model) -> list[int]:
    return [len(model.hook_dict[f"blocks.{i}.mlp.hook_post"].fwd_hooks) for i in range(2)]


def test_check_model_reads_shape(model):
    assert check_model(model) == (2, 64)


def test_raising_hook_leaves_no_hook(model, tokens):
    fresh = make_tiny_model(d_mlp=64)
    mask = HardConcreteMask.for_model(model, seed=0)

    def explode(activation, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), mask.applied(model):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mlp.hook_post", explode)])

    assert hook_counts(model) == [0, 0]
    with torch.no_grad():
        assert torch.equal(model(tokens), fresh(tokens))


def test_body_raising_removes_our_hooks(model):
    neurons = PrivacyNeurons(mask=torch.ones(2, 64, dtype=torch.bool))

    with pytest.raises(KeyError), neurons.ablated(model):
        assert hook_counts(model) == [1, 1]
        raise KeyError("inside")

    assert hook_counts(model) == [0, 0]


def test_user_hook_survives_our_context(model, tokens):
    calls = []

    def user_hook(activation, hook):
        calls.append(hook.name)
        return activation

    model.add_hook(POST, user_hook)
    mask = HardConcreteMask.for_model(model)
    with mask.applied(model):
        assert hook_counts(model) == [2, 1]
    neurons = PrivacyNeurons(mask=torch.ones(2, 64, dtype=torch.bool))
    with neurons.ablated(model):
        pass

    assert hook_counts(model) == [1, 0]
    with torch.no_grad():
        model(tokens)
    assert len(calls) == 1


def test_user_hook_added_inside_context_survives(model):
    mask = HardConcreteMask.for_model(model)

    with mask.applied(model):
        model.add_hook(POST, lambda activation, hook: activation)

    assert hook_counts(model) == [1, 0]


def test_attached_with_run_with_hooks_composes(model, tokens):
    neurons = PrivacyNeurons(mask=torch.ones(2, 64, dtype=torch.bool))
    seen = {}

    def capture(activation, hook):
        seen["post"] = activation
        return activation

    with attached(model, neurons.ablation_hooks()), torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(POST, capture)])
        assert hook_counts(model) == [1, 1]

    assert torch.count_nonzero(seen["post"]) == 0
    assert hook_counts(model) == [0, 0]


def test_model_hooks_context_accepts_our_hooks(model, tokens):
    mask = HardConcreteMask.for_model(model).eval()
    with torch.no_grad():
        mask.log_alpha.fill_(-50.0)
        with model.hooks(fwd_hooks=mask.fwd_hooks()):
            masked = model(tokens)
        via_run = model.run_with_hooks(tokens, fwd_hooks=mask.fwd_hooks())

    assert torch.equal(masked, via_run)
    assert hook_counts(model) == [0, 0]


def test_attach_reads_hook_dict_once(model, monkeypatch):
    # TransformerBridge builds a new hook_dict on every access, so attach looks it up once.
    hook_dict = getattr(type(model), "hook_dict", None)
    if not isinstance(hook_dict, property):
        pytest.skip("hook_dict is a plain attribute here (TransformerLens 3)")
    reads = []

    def counted(self):
        reads.append(1)
        return hook_dict.fget(self)

    monkeypatch.setattr(type(model), "hook_dict", property(counted))
    hooks = HardConcreteMask.for_model(model).fwd_hooks()
    reads.clear()  # for_model checks the model's hook points first

    with attached(model, hooks):
        pass

    assert len(hooks) > 1
    assert len(reads) == 1
