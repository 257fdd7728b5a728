"""Tests for tl_privacy.baselines: exact set sizes, seeding, pass counts and model state."""

from __future__ import annotations

import pytest
import torch

from tl_privacy.baselines import BASELINE_METHODS, BaselineConfig, score, select
from tl_privacy.data.tokenization import make_batches, pii_items
from tl_privacy.extraction import exact_match_teacher_forced
from tl_privacy.localization import LocalizationConfig, ReferenceCache, localize
from tl_privacy.objectives import shifted_targets

QUICK = BaselineConfig(ig_steps=3, slimming_steps=4)


@pytest.fixture(scope="module")
def batches(tiny_tokenizer, synthetic_corpus):
    return make_batches(tiny_tokenizer, synthetic_corpus.train[:6], batch_size=3)


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_each_method_selects_exactly_k(method, tiny_model, batches):
    n_neurons = tiny_model.cfg.n_layers * tiny_model.cfg.d_mlp
    scores, _ = score(method, tiny_model, batches, k=10, config=QUICK)
    assert scores.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.d_mlp)
    assert torch.isfinite(scores).all()

    for k in (1, 10, 137, n_neurons):
        neurons = select(method, tiny_model, batches, k, config=QUICK)
        assert neurons.count == k
        assert neurons.method == method
        for key in ("wall_time_s", "forward_passes", "backward_passes"):
            assert key in neurons.stats


def test_random_is_seeded(tiny_model, batches):
    first = select("random", tiny_model, batches, 50, seed=1)
    again = select("random", tiny_model, batches, 50, seed=1)
    other = select("random", tiny_model, batches, 50, seed=2)

    assert torch.equal(first.mask, again.mask)
    assert not torch.equal(first.mask, other.mask)
    assert first.stats["forward_passes"] == 0


def test_pass_counts(tiny_model, batches):
    n_batches, n_layers = len(batches), tiny_model.cfg.n_layers
    steps = QUICK.ig_steps

    activation = select("activation", tiny_model, batches, 5, config=QUICK).stats
    joint = select("integrated_gradients", tiny_model, batches, 5, config=QUICK).stats
    per_layer_config = BaselineConfig(ig_steps=steps, ig_mode="per_layer", max_batches=1)
    per_layer = select("integrated_gradients", tiny_model, batches, 5, config=per_layer_config)
    slimming = select("slimming", tiny_model, batches, 5, config=QUICK).stats

    assert (activation["forward_passes"], activation["backward_passes"]) == (n_batches, 0)
    assert joint["forward_passes"] == n_batches * (1 + steps)
    assert joint["backward_passes"] == n_batches * steps
    assert per_layer.stats["forward_passes"] == 1 + n_layers * steps
    assert per_layer.stats["backward_passes"] == n_layers * steps
    # One pass per step, plus one reference pass per distinct batch for the KL keep term.
    assert slimming["forward_passes"] == QUICK.slimming_steps + min(n_batches, QUICK.slimming_steps)
    assert slimming["backward_passes"] == QUICK.slimming_steps


def test_slimming_shares_localization_references(tiny_model, batches):
    references = ReferenceCache()
    settings = LocalizationConfig(steps=2, precision="float32", show_progress=False)
    localize(tiny_model, batches, settings, references=references)
    config = BaselineConfig(slimming_steps=4, precision="float32")

    shared = select("slimming", tiny_model, batches, 5, config=config, references=references)
    alone = select("slimming", tiny_model, batches, 5, config=config)

    assert shared.stats["forward_passes"] == config.slimming_steps
    assert alone.stats["forward_passes"] == config.slimming_steps + len(batches)
    # The shared entries are stored in float16; the first use of a fresh one is not.
    assert torch.allclose(shared.scores, alone.scores, atol=1e-3)
    with pytest.raises(ValueError, match="filled at precision 'float32'"):
        select(
            "slimming",
            tiny_model,
            batches,
            5,
            config=BaselineConfig(slimming_steps=1, precision="bfloat16"),
            references=references,
        )


@pytest.mark.parametrize("method", ["integrated_gradients", "slimming"])
def test_gradient_methods_need_gradients(method, tiny_model, batches):
    with torch.no_grad(), pytest.raises(RuntimeError, match="needs gradients"):
        select(method, tiny_model, batches, 5, config=QUICK)


def test_activation_scores_match_run_with_cache(tiny_model, batches):
    batch = batches[0]
    scores, _ = score("activation", tiny_model, [batch])

    _, pii, other = shifted_targets(batch)
    _, cache = tiny_model.run_with_cache(batch["input_ids"], attention_mask=batch["attention_mask"])
    for layer in range(tiny_model.cfg.n_layers):
        acts = cache[f"blocks.{layer}.mlp.hook_post"][:, :-1]
        expected = acts[pii].mean(0) - acts[other].mean(0)
        assert torch.allclose(scores[layer], expected, atol=1e-4), layer


def test_model_state_restored(tiny_model, batches):
    flags = [p.requires_grad for p in tiny_model.parameters()]
    weights = [p.detach().clone() for p in tiny_model.parameters()]
    training = tiny_model.training

    for method in ("integrated_gradients", "slimming"):
        select(method, tiny_model, batches, 5, config=QUICK)

    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert tiny_model.training == training
    assert all(torch.equal(p, w) for p, w in zip(tiny_model.parameters(), weights, strict=True))
    assert all(not point.fwd_hooks for point in tiny_model.hook_dict.values())


def test_type_restriction_changes_scores(tiny_model, batches):
    all_types, _ = score("activation", tiny_model, batches)
    phones, _ = score(
        "activation", tiny_model, batches, config=BaselineConfig(pii_types=("PHONE",))
    )
    assert not torch.allclose(all_types, phones)


def test_slimming_beats_random_on_memorized_model(memorized_tiny):
    model, corpus, _ = memorized_tiny
    items = pii_items(model.tokenizer, corpus.train)
    data = make_batches(model.tokenizer, corpus.train, batch_size=16)
    config = BaselineConfig(slimming_steps=40)

    slimmed = select("slimming", model, data, 64, config=config)
    chosen = select("random", model, data, 64)

    def extraction(neurons) -> float:
        hooks = neurons.ablation_hooks()
        return float(exact_match_teacher_forced(model, items, fwd_hooks=hooks).float().mean())

    assert slimmed.scores.min() >= 0
    assert slimmed.scores.max() <= 1
    assert extraction(slimmed) < extraction(chosen) - 0.1


def test_from_localization_copies_the_objective():
    localization = LocalizationConfig(steps=33, pii_loss="capped_ce", keep_loss="ce", batch_size=5)
    config = BaselineConfig.from_localization(localization, ig_steps=4)
    assert config.slimming_steps == 33
    assert (config.pii_loss, config.keep_loss, config.batch_size) == ("capped_ce", "ce", 5)
    assert config.ig_steps == 4


def test_bad_input_rejected(tiny_model, batches):
    with pytest.raises(ValueError, match="Unknown baseline"):
        select("magic", tiny_model, batches, 3)
    with pytest.raises(ValueError, match="k must be"):
        select("random", tiny_model, batches, -1)
    with pytest.raises(ValueError, match="ig_mode"):
        BaselineConfig(ig_mode="sideways")
    no_pii = [{**batches[0], "pii_mask": torch.zeros_like(batches[0]["pii_mask"])}]
    with pytest.raises(ValueError, match="No batch has a PII token"):
        select("activation", tiny_model, no_pii, 3)
