"""Tests for tl_privacy.metrics: exposure, MRR, token losses, perplexity and trie scoring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tl_privacy import metrics, models
from tl_privacy.data.records import PIIRecord, PIISpan
from tl_privacy.extraction import exact_match_teacher_forced
from tl_privacy.metrics import (
    ExposureConfig,
    _build_trie,
    _exposure_plans,
    _JobState,
    _paths_to,
    _TrieScorer,
    exposure_from_rank,
    exposure_from_scores,
    exposure_scores,
    general_perplexity,
    mean_reciprocal_rank,
    perplexity,
    record_metrics,
    sequence_nll,
    text_windows,
    tree_cache_mode,
)

# ---- exposure and MRR on constructed scores ----


def test_exposure_best_of_1024_is_10_bits():
    candidates = [-5.0 - i for i in range(1023)]
    rank, exposure = exposure_from_scores(-1.0, candidates)
    assert rank == 1
    assert exposure == pytest.approx(10.0)


def test_exposure_worst_of_1024_is_0_bits():
    candidates = [-5.0 + i * 0.001 for i in range(1023)]
    rank, exposure = exposure_from_scores(-100.0, candidates)
    assert rank == 1024
    assert exposure == pytest.approx(0.0)


def test_exposure_ties_count_against_true():
    rank, exposure = exposure_from_scores(0.0, [1.0, 0.0, 0.0, -1.0])
    assert rank == 4
    assert exposure == pytest.approx(math.log2(5) - 2)

    all_tied, _ = exposure_from_scores(-3.0, [-3.0] * 1023)
    assert all_tied == 1024


def test_exposure_tolerance_widens_ties():
    rank, _ = exposure_from_scores(0.0, [-0.5, -2.0], tolerance=1.0)
    assert rank == 2
    rank, _ = exposure_from_scores(0.0, [-0.5, -2.0])
    assert rank == 1


def test_exposure_rejects_nan_and_bad_rank():
    with pytest.raises(ValueError, match="NaN"):
        exposure_from_scores(float("nan"), [0.0])
    with pytest.raises(ValueError, match="NaN"):
        exposure_from_scores(0.0, [0.0, float("nan")])
    with pytest.raises(ValueError, match="rank must be"):
        exposure_from_rank(5, 3)


def test_mrr_of_constructed_ranks():
    assert mean_reciprocal_rank([1, 2, 4]) == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert mean_reciprocal_rank([1]) == 1.0
    assert math.isnan(mean_reciprocal_rank([]))
    with pytest.raises(ValueError, match=">= 1"):
        mean_reciprocal_rank([0])


# ---- token losses and perplexity ----


@pytest.fixture(scope="module")
def llama_bridge(tiny_llama_folder):
    """A random Hugging Face Llama behind a TransformerBridge, like SmolLM2."""
    return models.load_model(tiny_llama_folder)


@pytest.fixture(params=["native", "llama"])
def any_model(request, tiny_model, llama_bridge):
    return tiny_model if request.param == "native" else llama_bridge


def test_padding_does_not_change_losses(any_model):
    short = torch.tensor([0, 40, 41, 42, 43, 44])
    long = torch.arange(0, 30) % 400 + 3
    alone = sequence_nll(any_model, [short])[0]

    for side in ("left", "right"):
        batched = sequence_nll(any_model, [long, short, long[:9]], padding_side=side)
        assert batched[1].shape == alone.shape
        assert torch.allclose(batched[1], alone, atol=1e-4), side

    padded_ppl = math.exp(
        float(sequence_nll(any_model, [long, short], padding_side="left")[1].mean())
    )
    assert perplexity(any_model, [short]) == pytest.approx(padded_ppl, rel=1e-4)


def test_sequence_nll_matches_manual_log_softmax(tiny_model):
    sequence = torch.tensor([0, 7, 8, 9, 10])
    losses = sequence_nll(tiny_model, [sequence])[0]
    with torch.no_grad():
        log_probs = F.log_softmax(tiny_model(sequence[None])[0].float(), dim=-1)
    expected = -log_probs[torch.arange(4), sequence[1:]]
    assert torch.allclose(losses, expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_token_losses_match_log_softmax(dtype):
    # More rows than one float32 chunk, a -inf logit, and padding at the end of a row.
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(3, 9, 300, generator=generator)).to(dtype)
    logits[1, 2, 5] = -math.inf
    input_ids = torch.randint(0, 300, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, -3:] = 0

    nll, valid = metrics._nll_from_logits(logits, input_ids, attention_mask)

    wide = logits.to(torch.promote_types(dtype, torch.float32))
    expected = -F.log_softmax(wide[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    assert nll.dtype == wide.dtype
    assert valid.sum() == 3 * 8 - 3
    torch.testing.assert_close(nll, expected.masked_fill(~valid, 0.0), atol=1e-5, rtol=1e-5)


def test_sequence_nll_rejects_short_sequence(tiny_model):
    with pytest.raises(ValueError, match="at least two tokens"):
        sequence_nll(tiny_model, [torch.tensor([0])])


def test_text_windows_start_with_bos(tiny_tokenizer):
    windows = text_windows(tiny_tokenizer, window=64, max_tokens=300)
    assert all(len(window) <= 64 for window in windows)
    assert all(int(window[0]) == tiny_tokenizer.bos_token_id for window in windows)
    assert sum(len(window) - 1 for window in windows) == 300


def test_general_perplexity_under_hooks(tiny_model, tiny_tokenizer):
    clean = general_perplexity(tiny_model, tiny_tokenizer, max_tokens=200, window=64)
    hooks = [("blocks.0.mlp.hook_post", lambda activation, hook: activation * 0)]
    ablated = general_perplexity(
        tiny_model, tiny_tokenizer, fwd_hooks=hooks, max_tokens=200, window=64
    )
    assert math.isfinite(clean)
    assert clean > 1
    assert ablated != pytest.approx(clean)
    assert tiny_model.hook_dict["blocks.0.mlp.hook_post"].fwd_hooks == []


# ---- trie scoring against brute force ----


def brute_force_ranks(model, tokenizer, items, config):
    """Score the true PII and every candidate with one full forward pass each."""
    plans = _exposure_plans(tokenizer, items, config)
    ranks = []
    for index, item in enumerate(items):
        sequences = [item.target_ids]
        for job in plans[index].jobs:
            sequences += _paths_to(job, job.terminals)
        scores = []
        with torch.no_grad():
            for sequence in sequences:
                input_ids = torch.cat([item.prefix_ids, sequence])[None]
                log_probs = F.log_softmax(model(input_ids)[0].float(), dim=-1)
                start = len(item.prefix_ids) - 1
                positions = torch.arange(start, start + len(sequence))
                scores.append(float(log_probs[positions, sequence].sum()))
        ranks.append(exposure_from_scores(scores[0], scores[1:])[0])
    return ranks


@pytest.mark.parametrize(
    ("kind", "max_row_nodes", "trie_mode", "max_query_tokens", "records_per_row"),
    [
        ("native", 4096, "auto", 2048, 2),
        ("llama", 40, "auto", 2048, 2),
        ("llama", 4096, "auto", 2048, 2),
        # Level by level only, whole tries only, and whole tries over many small passes.
        ("llama", 40, "levels", 2048, 2),
        ("llama", 40, "whole", 2048, 2),
        ("llama", 4096, "whole", 6, 2),
        # Rows of one record, so that a pass covers two rows of different records.
        ("llama", 40, "auto", 2048, 1),
        ("llama", 4096, "levels", 2048, 1),
        # Rows of three records, where each record batch has two.
        ("llama", 4096, "levels", 2048, 3),
    ],
)
def test_trie_ranks_match_brute_force(
    kind,
    max_row_nodes,
    trie_mode,
    max_query_tokens,
    records_per_row,
    tiny_model,
    llama_bridge,
    tiny_tokenizer,
    synthetic_corpus,
):
    model = tiny_model if kind == "native" else llama_bridge
    records = synthetic_corpus.train[:3]
    # Small jobs, so that items are split over several jobs, rows and passes.
    config = ExposureConfig(
        n_candidates=12,
        max_job_nodes=24,
        max_row_nodes=max_row_nodes,
        records_per_row=records_per_row,
        rows_per_pass=2,
        seed=3,
        trie_mode=trie_mode,
        max_query_tokens=max_query_tokens,
    )

    result = exposure_scores(model, tiny_tokenizer, records, config=config, batch_size=2)
    items = record_metrics(model, tiny_tokenizer, records).items

    assert result.ranks == brute_force_ranks(model, tiny_tokenizer, items, config)
    assert len(result.items) == len(items)
    assert all(item.n_candidates == 12 for item in result.items)


@pytest.mark.parametrize(
    "name",
    ["max_job_nodes", "max_row_nodes", "records_per_row", "rows_per_pass", "max_query_tokens"],
)
def test_exposure_config_rejects_zero_counts(name):
    with pytest.raises(ValueError, match=f"{name} must be at least 1, got 0"):
        ExposureConfig(**{name: 0})


def test_trie_rows_without_plain_cache(llama_bridge, tiny_tokenizer, synthetic_corpus, monkeypatch):
    """A cache whose columns cannot be selected gets rows of one record, not an error."""
    records = synthetic_corpus.train[:3]
    config = ExposureConfig(n_candidates=12, max_job_nodes=24, records_per_row=3, seed=3)
    monkeypatch.setattr(metrics, "_plain_cache_layers", lambda cache: None)
    widths = []
    row_cache = metrics._runner_cache

    def recording_row_cache(cache, rows):
        widths.append(max(len({state.row for state in row}) for row in rows))
        return row_cache(cache, rows)

    monkeypatch.setattr(metrics, "_runner_cache", recording_row_cache)

    result = exposure_scores(llama_bridge, tiny_tokenizer, records, config=config, batch_size=2)
    items = record_metrics(llama_bridge, tiny_tokenizer, records).items

    assert widths
    assert set(widths) == {1}
    assert result.ranks == brute_force_ranks(llama_bridge, tiny_tokenizer, items, config)


@pytest.mark.parametrize("trie_mode", ["levels", "whole"])
def test_cache_compaction_keeps_ranks(
    trie_mode, llama_bridge, tiny_tokenizer, synthetic_corpus, monkeypatch
):
    records = synthetic_corpus.train[:3]
    config = ExposureConfig(
        n_candidates=12,
        max_job_nodes=24,
        rows_per_pass=2,
        seed=3,
        trie_mode=trie_mode,
        max_query_tokens=8,
    )
    monkeypatch.setattr(metrics, "_MIN_COLUMNS_TO_COMPACT", 1)
    dropped = []
    compact = metrics._CachedRunner._compact

    def counting_compact(runner):
        before = runner.cache_len
        compact(runner)
        dropped.append(before - runner.cache_len)

    monkeypatch.setattr(metrics._CachedRunner, "_compact", counting_compact)

    result = exposure_scores(llama_bridge, tiny_tokenizer, records, config=config, batch_size=2)
    items = record_metrics(llama_bridge, tiny_tokenizer, records).items

    assert sum(dropped) > 0
    assert result.ranks == brute_force_ranks(llama_bridge, tiny_tokenizer, items, config)


def test_child_log_probs_float64_logits():
    job = _build_trie((1, 2), [(3, 4), (3, 5)])
    parents = job.levels[0]
    logits = torch.randn(len(parents), 8, dtype=torch.float64)

    children, log_probs = metrics._child_log_probs(logits, job, parents)

    assert log_probs.dtype == torch.float32
    expected = torch.log_softmax(logits, -1)[
        (job.parents[children, None] == parents).int().argmax(1), job.tokens[children]
    ]
    torch.testing.assert_close(log_probs, expected.float())


def _first_level_state(bound: float, first_token_score: float) -> _JobState:
    """A job of 20 four-token candidates with distinct first tokens, scored at level 1."""
    job = _build_trie((1, 2, 3, 4), [(10 + i, 6, 7, 8) for i in range(20)])
    state = _JobState(
        job=job,
        item=0,
        row=0,
        prefix_len=3,
        true_log_probs=torch.zeros(5, 64),
        bound=bound,
        cum=torch.full((job.n_nodes,), -math.inf),
        cols=torch.full((job.n_nodes,), -1, dtype=torch.long),
        edge=torch.full((job.n_nodes,), math.nan),
    )
    first = job.levels[0]
    state.cum[first] = torch.where(job.true_depth[first] > 0, -0.1, first_token_score)
    return state


@pytest.mark.parametrize(
    ("bound", "first_token_score", "whole"),
    [
        # The true PII is unlikely: every candidate survives far above the bound.
        (-1000.0, -2.0, True),
        # The true PII is likely: every candidate is pruned after its first token.
        (-1.0, -5.0, False),
    ],
)
def test_auto_mode_whole_only_when_unpruned(bound, first_token_score, whole):
    scorer = _TrieScorer(None, None, None, {}, [], {}, {}, ExposureConfig())
    state = _first_level_state(bound, first_token_score)

    assert scorer._whole_from_here([state], depth=1) is whole


def test_auto_mode_whole_when_most_survive(monkeypatch):
    scorer = _TrieScorer(None, None, None, {}, [], {}, {}, ExposureConfig())
    # Every candidate survives its first token, 5 nats above the bound, but at 10 nats per
    # token the cost model predicts that none survives the next one.
    state = _first_level_state(bound=-15.0, first_token_score=-10.0)

    monkeypatch.setattr(metrics, "WHOLE_SURVIVOR_SHARE", 2.0)
    assert scorer._whole_from_here([state], depth=1) is False
    monkeypatch.setattr(metrics, "WHOLE_SURVIVOR_SHARE", 0.9)
    assert scorer._whole_from_here([state], depth=1) is True


def test_auto_mode_levels_when_half_pruned():
    scorer = _TrieScorer(None, None, None, {}, [], {}, {}, ExposureConfig())
    state = _first_level_state(bound=-15.0, first_token_score=-10.0)
    first = state.job.levels[0]
    candidates = first[state.job.true_depth[first] == 0]
    state.cum[candidates[::2]] = -20.0

    assert metrics._survivor_share([state], depth=1) == 0.5
    assert scorer._whole_from_here([state], depth=1) is False


def test_cache_mode_detection(tiny_model, llama_bridge):
    assert tree_cache_mode(tiny_model) is None
    assert tree_cache_mode(llama_bridge) in ("direct", "renamed")


def test_cached_and_uncached_scoring_agree(llama_bridge, tiny_tokenizer, synthetic_corpus):
    records = synthetic_corpus.train[3:5]
    cached = exposure_scores(
        llama_bridge, tiny_tokenizer, records, config=ExposureConfig(n_candidates=10)
    )
    uncached = exposure_scores(
        llama_bridge,
        tiny_tokenizer,
        records,
        config=ExposureConfig(n_candidates=10, use_kv_cache=False),
    )
    assert cached.ranks == uncached.ranks
    assert cached.exposure_mean == pytest.approx(uncached.exposure_mean)


def test_hooks_change_exposure_and_are_removed(llama_bridge, tiny_tokenizer, synthetic_corpus):
    records = synthetic_corpus.train[:2]
    config = ExposureConfig(n_candidates=10)
    hook_name = "blocks.1.mlp.hook_post"
    hooks = [(hook_name, lambda activation, hook: activation * 0)]

    clean = exposure_scores(llama_bridge, tiny_tokenizer, records, config=config)
    ablated = exposure_scores(llama_bridge, tiny_tokenizer, records, config=config, fwd_hooks=hooks)

    clean_likelihoods = [item.log_likelihood for item in clean.items]
    ablated_likelihoods = [item.log_likelihood for item in ablated.items]
    assert clean_likelihoods != pytest.approx(ablated_likelihoods)
    assert llama_bridge.hook_dict[hook_name].fwd_hooks == []


def test_exposure_result_aggregates(tiny_model, tiny_tokenizer, synthetic_corpus):
    result = exposure_scores(
        tiny_model,
        tiny_tokenizer,
        synthetic_corpus.train[:2],
        config=ExposureConfig(n_candidates=7),
    )
    assert result.mrr == pytest.approx(mean_reciprocal_rank(result.ranks))
    assert result.exposure_mean == pytest.approx(sum(result.distribution) / len(result.ranks))
    for item in result.items:
        assert 1 <= item.rank <= 8
        assert 0 <= item.exposure <= math.log2(8) + 1e-9
    assert set(result.by_type()) == {"NAME", "EMAIL", "PHONE", "ADDRESS"}


def test_record_token_metrics(tiny_model, tiny_tokenizer, synthetic_corpus):
    records = synthetic_corpus.train[:4]
    everything = record_metrics(tiny_model, tiny_tokenizer, records, batch_size=3)
    phones = record_metrics(tiny_model, tiny_tokenizer, records, types=("PHONE",))

    tokens = everything.tokens
    assert 0 <= tokens.pii_token_accuracy <= 1
    assert tokens.pii_cross_entropy > 0
    assert tokens.perplexity > 1
    assert set(tokens.by_type) == {"NAME", "EMAIL", "PHONE", "ADDRESS"}
    assert phones.tokens.n_pii_tokens == tokens.by_type["PHONE"]["n_tokens"]
    assert phones.tokens.pii_cross_entropy == pytest.approx(
        tokens.by_type["PHONE"]["pii_cross_entropy"], rel=1e-5
    )
    assert {item.type for item in phones.items} == {"PHONE"}
    assert everything.exposure is None


def test_max_items_per_type(tiny_model, tiny_tokenizer, synthetic_corpus):
    config = ExposureConfig(n_candidates=5, max_items_per_type=1)
    result = exposure_scores(tiny_model, tiny_tokenizer, synthetic_corpus.train[:3], config=config)

    ranked_types = [item.type for item in result.ranked]
    assert sorted(ranked_types) == ["ADDRESS", "EMAIL", "NAME", "PHONE"]
    assert len(result.items) > len(result.ranked)
    assert all(item.exposure is None for item in result.items if item.rank is None)


def test_item_scores_match_teacher_forced_extraction(memorized_tiny):
    model, corpus, _ = memorized_tiny
    metrics = record_metrics(model, model.tokenizer, corpus.train[:10], batch_size=4)
    expected = exact_match_teacher_forced(model, metrics.items)

    assert [score.exact for score in metrics.item_scores] == expected.tolist()
    assert any(score.exact for score in metrics.item_scores)
    for item, score in zip(metrics.items, metrics.item_scores, strict=True):
        with torch.no_grad():
            input_ids = torch.cat([item.prefix_ids, item.target_ids])[None]
            log_probs = F.log_softmax(model(input_ids)[0].float(), dim=-1)
        start = len(item.prefix_ids) - 1
        positions = torch.arange(start, start + len(item.target_ids))
        manual = float(log_probs[positions, item.target_ids].sum())
        assert score.log_likelihood == pytest.approx(manual, abs=1e-3)


def test_candidate_count_halves_when_too_few(tiny_model, tiny_tokenizer):
    text = "Call Bob at 555-0142 today."
    record = PIIRecord(text, (PIISpan(5, 8, "NAME"), PIISpan(12, 20, "PHONE")))
    # A 7-digit number has only 99 other fictional numbers, so 200 becomes 100, then 50.
    result = exposure_scores(
        tiny_model, tiny_tokenizer, [record], config=ExposureConfig(n_candidates=200)
    )

    counts = {item.type: item.n_candidates for item in result.items}
    assert counts == {"NAME": 200, "PHONE": 50}
    assert all(1 <= item.rank <= item.n_candidates + 1 for item in result.items)


def test_unknown_type_rejected(tiny_model, tiny_tokenizer, synthetic_corpus):
    with pytest.raises(ValueError, match="do not occur"):
        record_metrics(tiny_model, tiny_tokenizer, synthetic_corpus.train[:1], types=("SSN",))


# ---- greedy decoding behind the records' cache ----


@pytest.fixture(scope="module")
def memorized_llama(tiny_llama_folder, synthetic_corpus):
    """A fresh tiny Llama bridge fine-tuned on four records, so that greedy decoding follows
    the PII for some tokens and leaves it for others."""
    from tl_privacy.memorize import MemorizeConfig, memorize

    model = models.load_model(tiny_llama_folder)
    records = synthetic_corpus.train[:4]
    settings = MemorizeConfig(max_steps=60, lr=3e-3, trainable="all", show_progress=False)
    memorize(model, records, settings, cache=False)
    return model, records


def test_greedy_behind_records_matches_greedy_decode(memorized_llama):
    from tl_privacy.extraction import greedy_decode

    model, records = memorized_llama
    mixed = False
    # Scaling layer 1's neurons down moves the model off its memorized PII step by step.
    for scale in (1.0, 0.8, 0.6, 0.4, 0.2, 0.0):
        hooks = [("blocks.1.mlp.hook_post", lambda act, hook, s=scale: act * s)]
        metrics = record_metrics(model, model.tokenizer, records, fwd_hooks=hooks, greedy=True)
        reference = greedy_decode(
            model,
            [item.prefix_ids for item in metrics.items],
            [len(item.target_ids) for item in metrics.items],
            fwd_hooks=hooks,
            eos_token_id=model.tokenizer.eos_token_id,
        )
        decoded = [score.greedy_ids.tolist() for score in metrics.item_scores]
        assert decoded == [tokens.tolist() for tokens in reference], f"scale {scale}"
        follows = [
            d == item.target_ids.tolist() for d, item in zip(decoded, metrics.items, strict=True)
        ]
        if scale == 1.0:
            assert all(follows)
        mixed |= any(follows) and not all(follows)
    # Some items followed their PII and others left it, which is the decoder's other path.
    assert mixed
    assert model.hook_dict["blocks.1.mlp.hook_post"].fwd_hooks == []


def test_greedy_without_tree_cache_matches_greedy_decode(memorized_tiny):
    """A TL-native model has no KV cache; its items continue from the records' pass by
    re-running prefixes, and still give greedy_decode's tokens."""
    from tl_privacy.extraction import greedy_decode

    model, corpus, _ = memorized_tiny
    records = corpus.train[:8]
    hooks = [("blocks.1.mlp.hook_post", lambda act, hook: act * 0.3)]
    metrics = record_metrics(model, model.tokenizer, records, fwd_hooks=hooks, greedy=True)
    reference = greedy_decode(
        model,
        [item.prefix_ids for item in metrics.items],
        [len(item.target_ids) for item in metrics.items],
        fwd_hooks=hooks,
        eos_token_id=model.tokenizer.eos_token_id,
    )
    decoded = [score.greedy_ids.tolist() for score in metrics.item_scores]
    assert decoded == [tokens.tolist() for tokens in reference]
    follows = [
        d == item.target_ids.tolist() for d, item in zip(decoded, metrics.items, strict=True)
    ]
    assert any(follows)
    assert not all(follows)
