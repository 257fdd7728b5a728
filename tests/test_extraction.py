"""Tests for tl_privacy.extraction: greedy decoding, extraction scores, teacher forcing."""

from __future__ import annotations

import json

import pytest
import torch

from tl_privacy import models
from tl_privacy.data.tokenization import pii_items
from tl_privacy.extraction import (
    exact_match_teacher_forced,
    extraction_scores,
    greedy_decode,
    kv_cache_supported,
)


def prefixes_of(tokenizer, corpus, count: int) -> list[torch.Tensor]:
    """Prefixes of different lengths: the first ``count`` PII items of the training records."""
    return [item.prefix_ids for item in pii_items(tokenizer, corpus.train)[:count]]


def test_left_padded_batch_matches_single(tiny_model, tiny_tokenizer, synthetic_corpus):
    prefixes = prefixes_of(tiny_tokenizer, synthetic_corpus, 12)
    limits = [1 + index % 5 for index in range(len(prefixes))]
    assert len({len(prefix) for prefix in prefixes}) > 3

    batched = greedy_decode(tiny_model, prefixes, limits, batch_size=5)
    alone = [greedy_decode(tiny_model, [p], n)[0] for p, n in zip(prefixes, limits, strict=True)]

    for index, (tokens, expected) in enumerate(zip(batched, alone, strict=True)):
        assert len(tokens) == limits[index]
        assert torch.equal(tokens, expected), f"prefix {index}"


def test_eos_stops_row_and_is_dropped(tiny_model, tiny_tokenizer, synthetic_corpus):
    prefixes = prefixes_of(tiny_tokenizer, synthetic_corpus, 6)
    free = greedy_decode(tiny_model, prefixes, 8)
    eos = int(free[0][3])

    stopped = greedy_decode(tiny_model, prefixes, 8, eos_token_id=eos)

    for tokens, unbounded in zip(stopped, free, strict=True):
        hits = (unbounded == eos).nonzero()
        end = int(hits[0, 0]) if len(hits) else len(unbounded)
        assert torch.equal(tokens, unbounded[:end])
    assert len(stopped[0]) <= 3


def test_greedy_decode_limits_and_errors(tiny_model):
    prefixes = [torch.tensor([0, 5, 6]), torch.tensor([0, 7])]
    outputs = greedy_decode(tiny_model, prefixes, [0, 2])
    assert [len(tokens) for tokens in outputs] == [0, 2]
    assert greedy_decode(tiny_model, [], 3) == []

    with pytest.raises(ValueError, match="non-empty 1-D"):
        greedy_decode(tiny_model, [torch.tensor([], dtype=torch.long)], 2)
    with pytest.raises(ValueError, match="one per prefix"):
        greedy_decode(tiny_model, prefixes, [1, 2, 3])
    with pytest.raises(ValueError, match="batch_size"):
        greedy_decode(tiny_model, prefixes, 1, batch_size=0)


def test_hooks_apply_every_step_and_are_removed(tiny_model):
    prefix = torch.tensor([0, 40, 41, 42])
    calls = []

    def zero_neurons(activation, hook):
        calls.append(activation.shape[1])
        return torch.zeros_like(activation)

    hook_name = "blocks.0.mlp.hook_post"
    clean = greedy_decode(tiny_model, [prefix], 5)[0]
    ablated = greedy_decode(tiny_model, [prefix], 5, fwd_hooks=[(hook_name, zero_neurons)])[0]

    assert calls == [4, 5, 6, 7, 8]
    assert not torch.equal(clean, ablated)
    assert tiny_model.hook_dict[hook_name].fwd_hooks == []
    assert torch.equal(greedy_decode(tiny_model, [prefix], 5)[0], clean)


def test_kv_cache_matches_full_rerun(tiny_llama_folder, tiny_tokenizer, synthetic_corpus):
    model = models.load_model(tiny_llama_folder)
    prefixes = prefixes_of(tiny_tokenizer, synthetic_corpus, 6)

    assert kv_cache_supported(model)
    cached = greedy_decode(model, prefixes, 6, batch_size=3)
    rerun = greedy_decode(model, prefixes, 6, batch_size=3, use_kv_cache=False)
    alone = [greedy_decode(model, [prefix], 6)[0] for prefix in prefixes]

    for index in range(len(prefixes)):
        assert torch.equal(cached[index], rerun[index]), f"prefix {index}"
        assert torch.equal(cached[index], alone[index]), f"prefix {index}"


def test_native_model_has_no_kv_cache(tiny_model):
    assert not kv_cache_supported(tiny_model)


def test_teacher_forced_agrees_with_greedy(memorized_tiny):
    model, corpus, _ = memorized_tiny
    tokenizer = model.tokenizer
    items = pii_items(tokenizer, corpus.train[:12]) + pii_items(tokenizer, corpus.heldout[:4])

    exact = exact_match_teacher_forced(model, items, batch_size=16)
    generated = greedy_decode(
        model, [item.prefix_ids for item in items], [len(item.target_ids) for item in items]
    )
    greedy_exact = [
        torch.equal(tokens, item.target_ids) for tokens, item in zip(generated, items, strict=True)
    ]

    assert exact.dtype == torch.bool
    assert exact.shape == (len(items),)
    assert exact.tolist() == greedy_exact
    assert 0 < sum(greedy_exact) < len(items)


def test_teacher_forced_under_hooks(memorized_tiny):
    model, corpus, _ = memorized_tiny
    items = pii_items(model.tokenizer, corpus.train)
    hooks = [
        (f"blocks.{layer}.mlp.hook_post", lambda activation, hook: torch.zeros_like(activation))
        for layer in range(model.cfg.n_layers)
    ]

    clean = exact_match_teacher_forced(model, items)
    ablated = exact_match_teacher_forced(model, items, fwd_hooks=hooks)

    assert clean.float().mean() > 0.9
    assert ablated.float().mean() < 0.1


def test_extraction_scores_by_type(memorized_tiny):
    model, corpus, _ = memorized_tiny
    items = pii_items(model.tokenizer, corpus.train[:8])

    result = extraction_scores(model, items, batch_size=8)

    assert len(result.items) == len(items)
    assert set(result.by_type()) == {"NAME", "EMAIL", "PHONE", "ADDRESS"}
    assert sum(aggregate.n_items for aggregate in result.by_type().values()) == len(items)
    for item, scored in zip(items, result.items, strict=True):
        assert scored.target == model.tokenizer.decode(item.target_ids).strip()
        assert scored.exact == (scored.decoded == scored.target)
        if scored.exact:
            assert scored.similarity == 1.0
        else:
            assert scored.similarity < 1.0
    assert result.exact_rate == sum(scored.exact for scored in result.items) / len(items)
    assert json.loads(json.dumps(result.to_dict()))["overall"]["n_items"] == len(items)


def test_extraction_scores_of_untrained_model(tiny_model, tiny_tokenizer, synthetic_corpus):
    items = pii_items(tiny_tokenizer, synthetic_corpus.train[:4])

    result = extraction_scores(tiny_model, items)

    assert result.exact_rate == 0.0
    assert 0.0 <= result.similarity < 0.5


def test_smollm2_greedy_decode_uses_kv_cache(smollm2):
    prompts = ["The capital of France is", "My favourite colour is blue and my dog's name is"]
    prefixes = [smollm2.to_tokens(prompt, prepend_bos=False)[0] for prompt in prompts]

    assert kv_cache_supported(smollm2)
    cached = greedy_decode(smollm2, prefixes, 4)
    rerun = greedy_decode(smollm2, prefixes, 4, use_kv_cache=False)

    assert smollm2.tokenizer.decode(cached[0]).startswith(" Paris")
    for tokens, expected in zip(cached, rerun, strict=True):
        assert torch.equal(tokens, expected)
