"""The adversarial localizer: gradients, frozen weights, budgets, seeds and input checks."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch

from tests._memorized import PII_END, PII_START, make_tiny_model
from tl_privacy import LocalizationConfig, localize
from tl_privacy.hooks import attached
from tl_privacy.localization import Localizer, ReferenceCache, as_batches
from tl_privacy.objectives import (
    pii_runs,
    pii_suppression_loss,
    selected_log_probs,
    token_log_probs,
)
from tl_privacy.precision import autocast
from tl_privacy.readout import predicting_logits


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(d_mlp=64, seed=0)


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 256, (8, 24), generator=generator)
    pii_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    pii_mask[:, PII_START:PII_END] = True
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0
    pii_type_ids = torch.where(pii_mask, 1, -1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pii_mask": pii_mask,
        "pii_type_ids": pii_type_ids,
    }


def quick(**kwargs) -> LocalizationConfig:
    return LocalizationConfig(**{"steps": 6, "show_progress": False, "budget": 0.1, **kwargs})


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("keep", ["kl", "ce"])
def test_one_step_trains_only_log_alpha(model, batch, keep, precision):
    with Localizer(model, quick(keep_loss=keep, precision=precision)) as localizer:
        localizer.step(batch)
        grad = localizer.mask.log_alpha.grad

        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0
        assert all(param.grad is None for param in model.parameters())
        # Under bfloat16 the weights require grad so that autocast casts them once per run
        # (see weights_cast_once); they still get no gradient.
        flags = {param.requires_grad for param in model.parameters()}
        assert flags == ({True} if precision == "bfloat16" else {False})


def test_casting_weights_once_changes_no_gate(model, batch, monkeypatch):
    config = quick(steps=8, precision="bfloat16")
    cast_once = localize(model, batch, config)

    # The casts autocast makes on every pass give the same bfloat16 weights.
    monkeypatch.setattr(
        "tl_privacy.localization.weights_cast_once",
        lambda model, precision: autocast(model, precision),
    )
    per_pass = localize(model, batch, config)

    assert torch.equal(cast_once.scores, per_pass.scores)
    assert torch.equal(cast_once.mask, per_pass.mask)


def test_run_inside_open_localizer_restores_model(model, batch):
    flags = [param.requires_grad for param in model.parameters()]

    with Localizer(model, quick(precision="bfloat16")) as localizer:
        localizer.run(batch)

    assert not torch.is_autocast_enabled("cpu")
    assert [param.requires_grad for param in model.parameters()] == flags
    assert all(not model.hook_dict[f"blocks.{i}.mlp.hook_post"].fwd_hooks for i in range(2))


def test_localize_without_gradients_raises(model, batch):
    with torch.no_grad(), pytest.raises(RuntimeError, match="gradients are off"):
        localize(model, batch, quick())


def test_steps_keep_no_activations(model, batch, monkeypatch):
    """Nothing of a step's forward pass outlives the step: the gated MLP activations, the
    residual stream and the logit rows of the loss are all freed once it returns."""
    seen: list[weakref.ref] = []

    def observe(activation, hook):
        seen.append(weakref.ref(activation))

    def observed_logits(*args, **kwargs):
        rows = predicting_logits(*args, **kwargs)
        seen.extend(weakref.ref(r) for r in rows)
        return rows

    monkeypatch.setattr("tl_privacy.localization.predicting_logits", observed_logits)
    names = [f"blocks.{i}.mlp.hook_post" for i in range(2)] + ["blocks.1.hook_resid_post"]
    with Localizer(model, quick(precision="float32")) as localizer:
        with attached(model, [(name, observe) for name in names]):
            for key in range(3):
                localizer.step(batch, key=key)
        gc.collect()

        # Per step (each with a new key): the reference pass (hooks and its keep rows) and
        # the gated pass (hooks, PII rows and keep rows).
        assert len(seen) == 3 * (2 * len(names) + 3)
        assert [ref for ref in seen if ref() is not None] == []


def test_model_state_restored(model, batch):
    flags = [param.requires_grad for param in model.parameters()]
    before = {name: param.clone() for name, param in model.named_parameters()}
    model.train()

    localize(model, batch, quick())

    assert model.training
    model.eval()
    assert [param.requires_grad for param in model.parameters()] == flags
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters())
    assert all(not model.hook_dict[f"blocks.{i}.mlp.hook_post"].fwd_hooks for i in range(2))


def test_same_seed_same_set(model, batch):
    config = quick(steps=40, lr=0.3, budget=0.2)

    first = localize(model, batch, config)
    second = localize(model, batch, config)

    assert torch.equal(first.mask, second.mask)
    assert torch.equal(first.scores, second.scores)


def test_other_seed_other_scores(model, batch):
    first = localize(model, batch, quick(seed=0))
    second = localize(model, batch, quick(seed=1))

    assert not torch.equal(first.scores, second.scores)


def test_budget_caps_the_set(model, batch):
    config = quick(steps=40, lr=0.5, budget=5, l0_weight=0.0, selection="closed")
    neurons = localize(model, batch, config)

    assert neurons.count <= 5
    assert neurons.stats["budget"] == 5
    assert neurons.stats["forward_passes"] == 40 + 1
    assert neurons.stats["backward_passes"] == 40


def test_budget_selection_takes_exactly_budget(model, batch):
    neurons = localize(model, batch, quick(budget=7, selection="budget"))

    assert neurons.count == 7
    assert neurons.scores[neurons.mask].min() >= neurons.scores[~neurons.mask].max()


def test_sufficient_selection_within_budget(model, batch):
    neurons = localize(model, batch, quick(steps=20, lr=0.3, budget=12))

    assert 1 <= neurons.count <= 12
    assert neurons.stats["exact_match_ablated"] <= neurons.stats["exact_match_clean"]
    assert neurons.stats["forward_passes"] > 20


def test_budget_fraction_to_count():
    config = LocalizationConfig(budget=0.01)
    assert config.budget_count(46080) == 461
    assert LocalizationConfig(budget=25).budget_count(100) == 25
    assert LocalizationConfig(budget=None).budget_count(100) is None
    with pytest.raises(ValueError, match="exceeds"):
        LocalizationConfig(budget=200).budget_count(100)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, "steps must be a positive integer"),
        ("steps", 2.5, "steps must be a positive integer"),
        ("lr", -1.0, "lr must be a finite number > 0"),
        ("lr", float("nan"), "lr must be a finite number > 0"),
        ("temperature", 0.0, "temperature must be a finite number > 0"),
        ("budget", 0.0, "budget must be"),
        ("budget", 1.5, "whole neuron count"),
        ("budget", True, "budget must be"),
        ("pii_types", "EMAIL", r"the string 'EMAIL'; write \('EMAIL',\)"),
        ("pii_loss", "mse", "pii_loss must be"),
        ("keep_loss", "l2", "keep_loss must be"),
        ("pii_types", ("SSN",), "not among type_names"),
        ("selection", "all", "selection must be"),
        ("target_reduction", 0.0, "target_reduction must be"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        LocalizationConfig(**{field: value})


def test_non_finite_loss_names_the_term(model, batch):
    def poison(activation, hook):
        return activation * float("nan")

    model.add_hook("blocks.1.mlp.hook_post", poison)
    try:
        with pytest.raises(FloatingPointError, match="PII suppression"):
            localize(model, batch, quick(keep_loss="ce"))
    finally:
        model.hook_dict["blocks.1.mlp.hook_post"].remove_hooks("fwd")

    assert all(not model.hook_dict[f"blocks.{i}.mlp.hook_post"].fwd_hooks for i in range(2))


def test_batches_without_pii_rejected(model, batch):
    empty = {**batch, "pii_mask": torch.zeros_like(batch["pii_mask"])}
    with pytest.raises(ValueError, match="No batch has a PII token"):
        localize(model, empty, quick())


def test_batch_shape_mismatch_rejected():
    bad = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "pii_mask": torch.zeros(2, 4)}
    with pytest.raises(ValueError, match="pii_mask has shape"):
        as_batches(bad, 8, "cpu")


def test_padding_is_never_pii(batch):
    padded = {**batch, "pii_mask": torch.ones_like(batch["pii_mask"])}
    (prepared,) = as_batches(padded, 8, "cpu")
    assert not prepared["pii_mask"][0, -3:].any()


def test_plain_tensors_split_into_batches(batch):
    batches = as_batches(batch, 3, "cpu")
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 2]


def test_type_restriction(model, batch):
    other_type = {**batch, "pii_type_ids": torch.where(batch["pii_mask"], 0, -1)}
    with pytest.raises(ValueError, match="of types"):
        localize(model, other_type, quick(pii_types=("PHONE",)))
    neurons = localize(model, batch, quick(pii_types=("PHONE",)))
    assert neurons.pii_types == ("PHONE",)


def test_shared_reference_cache_skips_reference_passes(model, batch):
    references = ReferenceCache()
    batches = as_batches(batch, 4, torch.device("cpu"))
    config = quick(selection="budget", precision="float32")
    alone = localize(model, batches, config)
    first = localize(model, batches, config, references=references)
    phone = dataclasses.replace(config, pii_types=("PHONE",))
    shared = localize(model, batches, phone, references=references)
    unshared = localize(model, batches, phone)

    # Two batches: each run without a filled cache spends one reference pass per batch.
    assert alone.stats["forward_passes"] == 6 + 2
    assert first.stats["forward_passes"] == 6 + 2
    assert shared.stats["forward_passes"] == 6
    assert unshared.stats["forward_passes"] == 6 + 2
    assert sorted(references.entries) == [0, 1]
    assert torch.equal(first.scores, alone.scores)
    # The shared entries are float16 copies, so the scores move only by rounding.
    assert torch.allclose(shared.scores, unshared.scores, atol=1e-2)
    assert torch.equal(shared.mask, unshared.mask)


def test_reference_cache_rejects_another_model(model, batch):
    references = ReferenceCache()
    localize(model, batch, quick(precision="float32"), references=references)
    other = make_tiny_model(d_mlp=64, seed=1)

    with pytest.raises(ValueError, match="filled by another model"):
        localize(other, batch, quick(precision="float32"), references=references)
    with pytest.raises(ValueError, match="filled at precision 'float32', not 'bfloat16'"):
        localize(model, batch, quick(precision="bfloat16"), references=references)


def test_reference_cache_rejects_other_batches(model, batch):
    references = ReferenceCache()
    localize(model, batch, quick(precision="float32"), references=references)
    shuffled = {key: value.flip(0) for key, value in batch.items()}

    with pytest.raises(ValueError, match="batch 0 differs"):
        localize(model, shuffled, quick(precision="float32"), references=references)


def test_reference_cache_rejects_negative_limit():
    with pytest.raises(ValueError, match="limit_mb must be >= 0"):
        ReferenceCache(limit_mb=-1)


def test_reference_cache_binds_on_first_lookup(model, batch):
    references = ReferenceCache()
    no_pii = {**batch, "pii_mask": torch.zeros_like(batch["pii_mask"])}
    with pytest.raises(ValueError, match="No batch has a PII token"):
        localize(model, no_pii, quick(), references=references)
    localize(model, batch, quick(keep_loss="ce"), references=references)
    other = make_tiny_model(d_mlp=64, seed=1)

    localize(other, batch, quick(), references=references)

    assert sorted(references.entries) == [0]


def test_pii_runs_numbers_strings():
    pii = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 1]], dtype=torch.bool)
    runs = pii_runs(pii)
    assert runs[pii].tolist() == [0, 0, 1, 2, 2, 3]


def test_selected_log_probs_match_full_log_softmax():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (3, 6), generator=generator)
    selected = torch.rand(3, 6, generator=generator) < 0.4

    full = token_log_probs(logits, targets)[selected]
    rows = selected_log_probs(logits, targets, selected)
    (full_grad,) = torch.autograd.grad(full.sum(), logits)
    (rows_grad,) = torch.autograd.grad(rows.sum(), logits)

    assert selected.any()
    assert torch.allclose(rows, full, atol=1e-6)
    assert torch.allclose(rows_grad, full_grad, atol=1e-6)


@pytest.mark.parametrize("form", ["sequence", "unlikelihood", "capped_ce"])
def test_pii_loss_is_bounded(batch, form):
    certain = torch.full((8, 24, 256), -1e4)
    certain.scatter_(-1, batch["input_ids"].roll(-1, dims=1).unsqueeze(-1), 1e4)

    loss = pii_suppression_loss(certain, batch, form)

    assert torch.isfinite(loss)
    assert loss.abs() <= 14.0


def test_submodule_modes_come_back(model, batch):
    model.train()
    model.blocks[0].attn.eval()

    localize(model, batch, quick(steps=2))

    assert model.training and model.blocks[1].attn.training
    assert not model.blocks[0].attn.training
    model.eval()


def test_result_keeps_mask_sampling(model, batch):
    with Localizer(model, quick()) as localizer:
        localizer.step(batch)
        localizer.result()

        assert localizer.mask.training


def test_step_without_key_caching(model, batch):
    other = {key: value.flip(0) for key, value in batch.items()}
    with Localizer(model, quick()) as localizer:
        prepared = localizer.prepare(batch)
        localizer.step(prepared[0])
        localizer.step(other)
        localizer.step(prepared[0])
        localizer.step(other)

        # Four gated passes. The prepared batch's reference pass ran once and was cached;
        # the other batch's runs each time it is stepped on.
        assert localizer.passes["forward"] == 4 + 1 + 2


def test_token_ids_beyond_vocabulary(model, batch):
    foreign = {**batch, "input_ids": batch["input_ids"] + model.cfg.d_vocab}

    with pytest.raises(ValueError, match=f"vocabulary has ids 0 to {model.cfg.d_vocab - 1}"):
        localize(model, foreign, quick())
