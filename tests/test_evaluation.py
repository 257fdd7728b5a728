"""Tests for tl_privacy.evaluation: extraction scoring, evaluate() and compare()."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager

import pytest
import torch

from tl_privacy.data.tokenization import pii_items
from tl_privacy.evaluation import (
    RESULT_KEYS,
    SUMMARY_METRICS,
    EvaluationConfig,
    EvaluationResult,
    compare,
    evaluate,
)
from tl_privacy.extraction import extraction_scores

# ---- extraction on a scripted stub model ----


class ScriptedModel(torch.nn.Module):
    """A TL-like stub whose next token follows a script per prompt, then EOS.

    For an input whose real tokens start with a scripted prefix (the longest that matches),
    the logits at the last position put all mass on the next scripted token. Unscripted
    inputs get EOS.
    """

    def __init__(self, tokenizer, scripts: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.scripts = dict(sorted(scripts.items(), key=lambda entry: -len(entry[0])))
        self.vocab = len(tokenizer)
        self.eos = tokenizer.eos_token_id

    @contextmanager
    def hooks(self, fwd_hooks=()):
        yield self

    def forward(self, input_ids, attention_mask=None, return_type="logits", **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = torch.full((*input_ids.shape, self.vocab), -1e4)
        for row in range(input_ids.shape[0]):
            real = input_ids[row][attention_mask[row].bool()].tolist()
            logits[row, -1, self._next_token(real)] = 0.0
        return logits

    def _next_token(self, real: list[int]) -> int:
        for prefix, continuation in self.scripts.items():
            if tuple(real[: len(prefix)]) == prefix:
                generated = len(real) - len(prefix)
                return continuation[generated] if generated < len(continuation) else self.eos
        return self.eos


def one_digit_wrong(tokenizer, item) -> list[int]:
    text = tokenizer.decode(item.target_ids.tolist())
    position = max(i for i, character in enumerate(text) if character.isdigit())
    changed = "3" if text[position] != "3" else "4"
    return tokenizer.encode(text[:position] + changed + text[position + 1 :])


def test_extraction_of_scripted_outputs(tiny_tokenizer, synthetic_corpus):
    items = pii_items(tiny_tokenizer, synthetic_corpus.train[:1])
    email, phone, name = (
        next(item for item in items if item.type == wanted) for wanted in ("EMAIL", "PHONE", "NAME")
    )
    scripts = {
        tuple(email.prefix_ids.tolist()): email.target_ids.tolist(),
        tuple(phone.prefix_ids.tolist()): one_digit_wrong(tiny_tokenizer, phone),
        # The NAME item's prefix gets no script, so the stub emits EOS at once.
    }
    model = ScriptedModel(tiny_tokenizer, scripts)
    chosen = [email, phone, name]

    first = extraction_scores(model, chosen, batch_size=2)
    second = extraction_scores(model, chosen, batch_size=3)

    assert [result.exact for result in first.items] == [True, False, False]
    assert first.items[0].similarity == 1.0
    assert 0.8 < first.items[1].similarity < 1.0
    assert first.items[2].decoded == ""
    assert first.items == second.items


# ---- evaluate ----


QUICK = EvaluationConfig(
    n_candidates=6, general_text_tokens=200, window=64, batch_size=4, heldout_exposure=True
)


@pytest.fixture(scope="module")
def clean_result(tiny_model, tiny_tokenizer, synthetic_corpus) -> EvaluationResult:
    return evaluate(
        tiny_model,
        tiny_tokenizer,
        synthetic_corpus.train[:4],
        synthetic_corpus.heldout[:2],
        config=QUICK,
    )


def test_evaluate_returns_every_key_finite(clean_result, tiny_tokenizer, synthetic_corpus):
    values = clean_result.to_dict()

    assert tuple(values) == RESULT_KEYS
    for metric in SUMMARY_METRICS:
        assert isinstance(values[metric], float), metric
        assert math.isfinite(values[metric]), metric
    assert values["seconds"] > 0
    json.dumps(values)

    n_items = len(pii_items(tiny_tokenizer, synthetic_corpus.train[:4]))
    assert len(values["items"]) == n_items
    assert set(values["by_type"]) == {"NAME", "EMAIL", "PHONE", "ADDRESS"}
    for row in values["items"]:
        assert {"type", "exact", "similarity", "rank", "exposure", "pii"} <= set(row)
        assert 1 <= row["rank"] <= 7
        assert row["n_candidates"] == 6


def test_evaluate_hooks_removed_afterwards(
    clean_result, tiny_model, tiny_tokenizer, synthetic_corpus
):
    names = [f"blocks.{layer}.mlp.hook_post" for layer in range(tiny_model.cfg.n_layers)]
    hooks = [(name, lambda activation, hook: activation * 0) for name in names]

    ablated = evaluate(
        tiny_model,
        tiny_tokenizer,
        synthetic_corpus.train[:4],
        synthetic_corpus.heldout[:2],
        fwd_hooks=hooks,
        config=QUICK,
    )
    again = evaluate(
        tiny_model,
        tiny_tokenizer,
        synthetic_corpus.train[:4],
        synthetic_corpus.heldout[:2],
        config=QUICK,
    )

    assert ablated.perplexity_general != pytest.approx(clean_result.perplexity_general)
    assert all(tiny_model.hook_dict[name].fwd_hooks == [] for name in names)
    for metric in SUMMARY_METRICS:
        assert getattr(again, metric) == pytest.approx(getattr(clean_result, metric)), metric


def test_evaluate_hooks_from_generator(tiny_model, tiny_tokenizer, synthetic_corpus):
    names = [f"blocks.{layer}.mlp.hook_post" for layer in range(tiny_model.cfg.n_layers)]
    config = EvaluationConfig(n_candidates=0, general_text_tokens=100, window=64)
    records = synthetic_corpus.train[:2]

    def hooks():
        return ((name, lambda activation, hook: activation * 0) for name in names)

    from_list = evaluate(
        tiny_model, tiny_tokenizer, records, fwd_hooks=list(hooks()), config=config
    )
    from_generator = evaluate(tiny_model, tiny_tokenizer, records, fwd_hooks=hooks(), config=config)

    assert from_generator.perplexity_general == from_list.perplexity_general


def test_evaluate_rejects_dict_records(tiny_model, tiny_tokenizer):
    with pytest.raises(TypeError, match="PIIRecord objects, got a dict; convert"):
        evaluate(tiny_model, tiny_tokenizer, [{"text": "a", "spans": []}])


def test_evaluate_without_heldout_or_exposure(tiny_model, tiny_tokenizer, synthetic_corpus):
    config = EvaluationConfig(n_candidates=0, general_text_tokens=100, window=64)
    result = evaluate(tiny_model, tiny_tokenizer, synthetic_corpus.train[:2], None, config=config)
    values = result.to_dict()

    assert values["perplexity_heldout"] is None
    assert values["heldout_extraction_exact"] is None
    assert values["heldout_exposure_mean"] is None
    assert values["exposure_mean"] is None
    assert values["mrr"] is None
    assert all(row["rank"] is None for row in values["items"])


@pytest.fixture(scope="module")
def memorized_result(memorized_tiny) -> EvaluationResult:
    model, corpus, _ = memorized_tiny
    config = EvaluationConfig(n_candidates=20, general_text_tokens=200, window=64)
    return evaluate(model, model.tokenizer, corpus.train, corpus.heldout, config=config)


def test_evaluate_on_memorized_model(memorized_result):
    result = memorized_result

    assert result.extraction_exact > 0.9
    assert result.pii_token_accuracy > 0.9
    assert result.heldout_extraction_exact < 0.2
    assert result.perplexity_train < result.perplexity_heldout
    # A memorized PII ranks first among 20 candidates: exposure log2(21) = 4.39 bits.
    assert result.exposure_mean > 3.5
    assert result.mrr > 0.8


def test_heldout_exposure_is_opt_in(memorized_tiny, memorized_result):
    model, corpus, _ = memorized_tiny
    config = EvaluationConfig(
        n_candidates=20,
        general_text_tokens=200,
        window=64,
        extraction="teacher_forced",
        heldout_exposure=True,
    )
    result = evaluate(model, model.tokenizer, corpus.train, corpus.heldout, config=config)

    assert memorized_result.heldout_exposure_mean is None
    # The same candidates, so the training items' exposure is unchanged by the option.
    assert result.exposure_mean == pytest.approx(memorized_result.exposure_mean)
    # PII the model never saw ranks lower than memorized PII.
    assert result.heldout_exposure_mean is not None
    assert 0.0 <= result.heldout_exposure_mean < result.exposure_mean - 1.0
    per_type = [values["heldout_exposure_mean"] for values in result.by_type.values()]
    assert all(value is not None and value >= 0.0 for value in per_type)
    assert all(v["heldout_exposure_mean"] is None for v in memorized_result.by_type.values())


def test_teacher_forced_extraction_agrees(memorized_tiny, memorized_result):
    model, corpus, _ = memorized_tiny
    config = EvaluationConfig(
        n_candidates=0, general_text_tokens=200, window=64, extraction="teacher_forced"
    )
    result = evaluate(model, model.tokenizer, corpus.train, corpus.heldout, config=config)

    greedy_exact = [row["exact"] for row in memorized_result.items]
    assert [row["exact"] for row in result.items] == greedy_exact
    assert result.extraction_exact == memorized_result.extraction_exact
    assert result.heldout_extraction_exact == memorized_result.heldout_extraction_exact
    assert result.extraction_similarity is None
    assert all(row["decoded"] is None for row in result.items)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_candidates", -1, "n_candidates"),
        ("batch_size", 0, "batch_size"),
        ("general_text_tokens", 1, "general_text_tokens"),
        ("types", "PHONE", "tuple of type names"),
        ("extraction", "beam", "extraction must be"),
        ("fused_attention", "no", "must be True or False"),
        ("n_candidates", 2.5, "n_candidates must be an integer"),
        ("window", 1, "window must be at least 2"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        EvaluationConfig(**{field: value})


def test_config_passes_candidates_and_seed_to_exposure():
    config = EvaluationConfig(n_candidates=50, seed=7)
    assert config.exposure_config().n_candidates == 50
    assert config.exposure_config().seed == 7
    assert EvaluationConfig(n_candidates=0).exposure_config() is None


# ---- compare ----


def test_compare_arithmetic():
    clean = {
        "extraction_exact": 0.8,
        "perplexity_general": 20.0,
        "mrr": 0.0,
        "exposure_mean": None,
        "by_type": {"PHONE": {"n_items": 4, "extraction_exact": 1.0}},
    }
    edited = {
        "extraction_exact": 0.2,
        "perplexity_general": 22.0,
        "mrr": 0.5,
        "exposure_mean": 3.0,
        "by_type": {"PHONE": {"n_items": 4, "extraction_exact": 0.25}},
    }

    changes = compare(clean, edited)

    assert changes["extraction_exact"]["absolute"] == pytest.approx(-0.6)
    assert changes["extraction_exact"]["relative"] == pytest.approx(-0.75)
    assert changes["perplexity_general"]["absolute"] == pytest.approx(2.0)
    assert changes["perplexity_general"]["relative"] == pytest.approx(0.1)
    assert changes["mrr"]["absolute"] == pytest.approx(0.5)
    assert changes["mrr"]["relative"] is None
    assert changes["exposure_mean"] == {
        "clean": None,
        "edited": 3.0,
        "absolute": None,
        "relative": None,
    }
    assert changes["by_type"]["PHONE"]["extraction_exact"]["absolute"] == pytest.approx(-0.75)
    assert "n_items" not in changes["by_type"]["PHONE"]


def test_compare_accepts_results(clean_result):
    changes = compare(clean_result, clean_result)
    for metric in SUMMARY_METRICS:
        assert changes[metric]["absolute"] == 0.0, metric
