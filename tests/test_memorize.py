"""Tests for tl_privacy.memorize: fine-tuning until the PII is extractable, and its cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tl_privacy.memorize as tl_memorize
from tl_privacy import models
from tl_privacy.data.synthetic import SyntheticCorpusConfig, generate_corpus
from tl_privacy.data.tokenization import pii_items
from tl_privacy.extraction import extraction_scores
from tl_privacy.memorize import MemorizeConfig, MemorizeResult, memorize, trainable_parameters


@pytest.fixture(scope="module")
def small_corpus():
    return generate_corpus(SyntheticCorpusConfig(n_people=4, n_heldout_people=2, seed=1))


def parameters_by_name(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_memorize_tiny_extracts_training_pii(memorized_tiny):
    model, corpus, result = memorized_tiny

    train = extraction_scores(model, pii_items(model.tokenizer, corpus.train))
    heldout = extraction_scores(model, pii_items(model.tokenizer, corpus.heldout))
    print(
        f"tiny memorize: {result.steps} steps, {result.wall_time_s:.1f} s, lr {result.lr}; "
        f"greedy exact extraction {train.exact_rate:.3f} train, {heldout.exact_rate:.3f} "
        f"held out; held-out similarity {heldout.similarity:.2f}"
    )

    assert result.reached_target
    assert result.extraction_exact >= 0.95
    assert train.exact_rate >= 0.9
    assert heldout.exact_rate <= 0.05
    assert result.wall_time_s < 180
    assert result.heldout_extraction_exact == pytest.approx(heldout.exact_rate, abs=0.02)
    assert not model.training


def test_memorize_result_records_progress(memorized_tiny):
    _, corpus, result = memorized_tiny

    assert result.steps == len(result.loss_curve)
    assert result.loss_curve[-1] < result.loss_curve[0] / 4
    assert [step for step, _ in result.extraction_curve][-1] == result.steps
    assert result.n_train_records == len(corpus.train)
    assert result.trainable == "mlp"
    assert not result.cached


def test_memorize_cache_hit_returns_same_weights(tmp_path, tiny_tokenizer, small_corpus):
    config = MemorizeConfig(max_steps=6, eval_every=3, show_progress=False)
    trained = models.tiny_model(tiny_tokenizer, d_model=64, d_mlp=128)
    first = memorize(trained, small_corpus, config, cache_dir=tmp_path)

    fresh = models.tiny_model(tiny_tokenizer, d_model=64, d_mlp=128)
    untrained = models.model_fingerprint(fresh)
    second = memorize(fresh, small_corpus, config, cache_dir=tmp_path)

    assert not first.cached
    assert second.cached
    assert models.model_fingerprint(fresh) == models.model_fingerprint(trained)
    assert models.model_fingerprint(fresh) != untrained
    assert second.steps == first.steps == 6
    assert second.loss_curve == first.loss_curve
    assert second.cache_path == first.cache_path
    assert [path.name for path in (tmp_path / "memorized").iterdir()] == [
        Path(second.cache_path).name
    ]
    assert (Path(second.cache_path) / "weights.safetensors").is_file()


def test_memorize_cache_key_depends_on_config(tmp_path, tiny_tokenizer, small_corpus):
    for lr in (1e-3, 2e-3):
        model = models.tiny_model(tiny_tokenizer, d_model=64, d_mlp=128)
        config = MemorizeConfig(lr=lr, max_steps=2, eval_every=2, show_progress=False)
        assert not memorize(model, small_corpus, config, cache_dir=tmp_path).cached
    assert len(list((tmp_path / "memorized").iterdir())) == 2


def test_memorize_mlp_trains_only_mlp(tiny_tokenizer, small_corpus):
    model = models.tiny_model(tiny_tokenizer, d_model=64, d_mlp=128)
    mlp_ids = {id(p) for p in trainable_parameters(model, "mlp")}
    mlp_names = {name for name, p in model.named_parameters() if id(p) in mlp_ids}
    before = parameters_by_name(model)

    config = MemorizeConfig(max_steps=3, eval_every=3, show_progress=False)
    memorize(model, small_corpus, config, cache=False)

    after = parameters_by_name(model)
    assert mlp_names and all(".mlp." in name for name in mlp_names)
    for name, value in after.items():
        changed = not torch.equal(value, before[name])
        assert changed == (name in mlp_names), name
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training


def test_memorize_all_trains_embedding(tiny_tokenizer, small_corpus):
    model = models.tiny_model(tiny_tokenizer, d_model=64, d_mlp=128)
    embedding = model.embed.W_E.detach().clone()

    config = MemorizeConfig(max_steps=2, eval_every=2, trainable="all", show_progress=False)
    result = memorize(model, small_corpus.train, config, cache=False)

    assert not torch.equal(model.embed.W_E, embedding)
    assert result.heldout_extraction_exact is None
    assert result.n_heldout_items == 0


def test_interrupted_memorize_leaves_eval_mode(tiny_tokenizer, small_corpus, monkeypatch):
    model = models.tiny_model(tiny_tokenizer, d_model=64, d_mlp=128)
    flags = [p.requires_grad for p in model.parameters()]
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    real_loss = tl_memorize._lm_loss
    monkeypatch.setattr(tl_memorize, "_lm_loss", interrupted)
    config = MemorizeConfig(max_steps=5, eval_every=5, show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        memorize(model, small_corpus, config, cache=False)

    assert len(calls) == 2
    assert not any(module.training for module in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_memorize_config_rejects_bad_values():
    for bad in (
        {"lr": 0.0},
        {"max_steps": 0},
        {"batch_size": 0},
        {"eval_every": 0},
        {"target_extraction": 1.5},
        {"trainable": "attention"},
        {"weight_decay": -1.0},
        {"max_length": 1},
    ):
        with pytest.raises(ValueError):
            MemorizeConfig(**bad)


def test_memorize_rejects_bad_records(tiny_model):
    with pytest.raises(TypeError, match="PIICorpus or a list of PIIRecord"):
        memorize(tiny_model, "records.jsonl", cache=False)
    with pytest.raises(TypeError, match="load_records"):
        memorize(tiny_model, [{"text": "hello"}], cache=False)
    with pytest.raises(ValueError, match="at least one training record"):
        memorize(tiny_model, [], cache=False)


def test_memorize_result_round_trips_json(memorized_tiny):
    _, _, result = memorized_tiny
    restored = MemorizeResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert restored == result
