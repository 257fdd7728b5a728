"""Leakage and utility metrics of a model under any list of forward hooks.

Every metric runs the model under ``fwd_hooks``, so the clean model (no hooks), the model with
privacy neurons ablated and the baselines share one code path. Hooks are attached with
:func:`tl_privacy.hooks.attached` and removed when the metric returns, also on errors.

Metrics:

- Exposure (Carlini et al., "The Secret Sharer", USENIX Security 2019): each PII string is
  ranked among ``n`` candidate strings of the same format by the model's log-likelihood of the
  whole string given the record's prefix (sum of token log-probabilities, in nats), and
  ``exposure = log2(n + 1) - log2(rank)`` bits. Ties count against the true PII (see
  :func:`exposure_from_scores`).
- Mean reciprocal rank (MRR) of the true PII over the same candidates.
- Teacher-forced PII token accuracy and cross-entropy on the tokens of ``pii_mask``.
- Perplexity, ``exp`` of the mean token negative log-likelihood (natural log), on the
  non-PII tokens of records and on general English text.

Scoring 1,000 candidates for each of 160 PII items naively means 160,000 sequences of a whole
record prefix plus a candidate. :func:`record_metrics` instead runs each record once with a KV
cache, reads the true PII's score and the candidates' first tokens from that pass, and scores
the rest of the candidates as a token trie behind the cached record. A 4-D attention mask lets
each trie node see only its item's prefix and its own ancestors ("tree attention"), so
candidates that share leading tokens share their computation. The trie is run level by level
while that prunes: a candidate whose partial log-likelihood is already below the true PII's is
dropped, because further tokens can only lower it. Once most of a level survives (the model
finds the true PII unlikely, as after ablation), the rest of the trie runs in a few large
passes without pruning. Either way the ranks are exact. Models without a usable KV cache
(TL-native models) score each candidate as one ``prefix + candidate`` sequence instead, which
gives the same ranks at a higher cost.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_privacy.attention import is_fused
from tl_privacy.data.general import general_text
from tl_privacy.data.records import PIIRecord
from tl_privacy.data.synthetic import candidates_for
from tl_privacy.data.tokenization import (
    PIIItem,
    make_batches,
    pad_token_id,
    pii_items,
    type_names_for,
)
from tl_privacy.extraction import _cache_kwarg_renamed, greedy_decode
from tl_privacy.hooks import attached, model_logits
from tl_privacy.objectives import logsumexp_float32

logger = logging.getLogger("tl_privacy")

DEFAULT_N_CANDIDATES = 1000
"""Candidates per PII item for exposure and MRR, as in the "Secret Sharer" experiments."""

CANDIDATE_TYPES = ("EMAIL", "PHONE", "NAME", "ADDRESS")
"""PII types that :func:`tl_privacy.data.synthetic.candidates_for` can draw candidates for."""

DEFAULT_WINDOW = 256
"""Tokens per window (BOS included) for perplexity on long text, capped at the model's n_ctx."""


# ---- ranks, exposure and MRR ----


def exposure_from_scores(
    true_score: float,
    candidate_scores: Sequence[float] | Tensor,
    tolerance: float = 0.0,
) -> tuple[int, float]:
    """Rank the true PII among candidate strings and return ``(rank, exposure)``.

    Tie rule (pessimistic): ``rank = 1 + #{candidates scoring higher} + #{candidates scoring
    equal}``, so a candidate that ties with the true PII counts as ranked above it. A candidate
    counts as equal when its score is within ``tolerance`` of the true score.
    ``exposure = log2(N) - log2(rank)`` bits, with ``N`` the number of candidates plus the true
    PII: from ``log2(N)`` when the true PII scores highest to 0 when it scores lowest.

    Args:
        true_score: the model's log-likelihood of the true PII (any monotone score works).
        candidate_scores: the scores of the other candidates, in the same units.
        tolerance: width of the tie band, in the scores' units (>= 0).

    Raises:
        ValueError: if a score is NaN or the tolerance is negative.
    """
    scores = torch.as_tensor(candidate_scores, dtype=torch.float64).flatten()
    if math.isnan(true_score) or bool(torch.isnan(scores).any()):
        raise ValueError("exposure_from_scores got a NaN score; scores must be numbers or -inf.")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}.")
    rank = 1 + int((scores >= true_score - tolerance).sum())
    return rank, exposure_from_rank(rank, len(scores))


def exposure_from_rank(rank: int, n_candidates: int) -> float:
    """Exposure in bits of a true PII at ``rank`` among ``n_candidates`` other candidates."""
    if not 1 <= rank <= n_candidates + 1:
        raise ValueError(
            f"rank must be between 1 and n_candidates + 1 = {n_candidates + 1}, got {rank}."
        )
    return math.log2(n_candidates + 1) - math.log2(rank)


def mean_reciprocal_rank(ranks: Sequence[int]) -> float:
    """Mean of ``1 / rank`` over ``ranks`` (1 is best); NaN when there are no ranks."""
    if len(ranks) == 0:
        return math.nan
    if any(rank < 1 for rank in ranks):
        raise ValueError(f"ranks must be >= 1, got {min(ranks)}.")
    return sum(1.0 / rank for rank in ranks) / len(ranks)


# ---- teacher-forced token losses ----


def token_nll(
    model: Any,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> tuple[Float[Tensor, "batch pos_1"], Bool[Tensor, "batch pos_1"]]:
    """Negative log-likelihood (nats) of each next token, and where it is defined.

    Position ``t`` of the result is ``-log p(input_ids[:, t + 1] | input_ids[:, :t + 1])``.
    It is valid where both tokens are real (``attention_mask`` 1); elsewhere it is 0. Left
    and right padding give the same values for the real tokens, because the attention mask
    is passed on and TransformerLens derives the positions from it.
    """
    logits = model_logits(model, input_ids, attention_mask)
    return _nll_from_logits(logits, input_ids, attention_mask)


def _nll_from_logits(
    logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    # The loss is log-sum-exp minus the target's logit, in float32 a few rows at a time.
    # cross_entropy on logits.float() wrote two float32 copies of all logits instead, and
    # SmolLM2's general-text perplexity (22 windows of 256 tokens) took 2.6 to 4.1 s, not 2.0 s.
    targets = input_ids[:, 1:]
    batch, pos = logits.shape[:2]
    log_norm = logsumexp_float32(logits.flatten(0, 1)).view(batch, pos)[:, :-1]
    target_logits = logits[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    nll = log_norm - target_logits.to(log_norm.dtype)
    if attention_mask is None:
        valid = torch.ones_like(targets, dtype=torch.bool)
    else:
        real = attention_mask.bool()
        valid = real[:, :-1] & real[:, 1:]
    return nll.masked_fill(~valid, 0.0), valid


def sequence_nll(
    model: Any,
    sequences: Sequence[Int[Tensor, " pos"]],
    *,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
    batch_size: int = 8,
    padding_side: str = "right",
) -> list[Float[Tensor, " pos_1"]]:
    """Per-token negative log-likelihoods (nats) of each sequence, batched with padding.

    Returns, for each sequence of length ``n``, a tensor of ``n - 1`` losses: entry ``t`` is
    the loss of token ``t + 1``. ``padding_side`` only changes how batches are padded; the
    losses are the same either way (up to float rounding).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    for index, sequence in enumerate(sequences):
        if sequence.dim() != 1 or len(sequence) < 2:
            raise ValueError(
                f"sequence {index} has shape {tuple(sequence.shape)}; each needs at least two "
                "tokens (a first token to condition on and one to predict)."
            )

    device = _model_device(model)
    pad_id = _model_pad_id(model)
    losses: list[Tensor] = []
    with torch.no_grad(), attached(model, list(fwd_hooks)):
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            input_ids, attention_mask = _pad(chunk, pad_id, padding_side)
            nll, _ = token_nll(model, input_ids.to(device), attention_mask.to(device))
            nll = nll.cpu()
            width = input_ids.shape[1]
            for row, sequence in enumerate(chunk):
                first = 0 if padding_side == "right" else width - len(sequence)
                losses.append(nll[row, first : first + len(sequence) - 1])
    return losses


def perplexity(
    model: Any,
    sequences: Sequence[Int[Tensor, " pos"]],
    *,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
    batch_size: int = 8,
) -> float:
    """Perplexity ``exp(mean token NLL)`` over all predicted tokens of ``sequences``."""
    losses = sequence_nll(model, sequences, fwd_hooks=fwd_hooks, batch_size=batch_size)
    total = sum(float(loss.double().sum()) for loss in losses)
    count = sum(len(loss) for loss in losses)
    return math.exp(total / count) if count else math.nan


def text_windows(
    tokenizer: Any,
    text: str | None = None,
    *,
    window: int = DEFAULT_WINDOW,
    max_tokens: int | None = None,
) -> list[Int[Tensor, " pos"]]:
    """Tokenize ``text`` (default: :func:`tl_privacy.data.general_text`) into model windows.

    The text's tokens (at most ``max_tokens`` of them) are cut into consecutive pieces of
    ``window - 1`` tokens and each piece gets the tokenizer's BOS token in front, so every
    window is a valid model input of at most ``window`` tokens. A tokenizer without BOS gives
    windows of ``window`` text tokens. A last piece of a single token is dropped, because it
    has no token to predict.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}.")
    text = general_text() if text is None else text
    ids = [int(token) for token in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1 or None, got {max_tokens}.")
        ids = ids[:max_tokens]

    bos = getattr(tokenizer, "bos_token_id", None)
    piece = window - 1 if bos is not None else window
    windows = []
    for start in range(0, len(ids), piece):
        tokens = ids[start : start + piece]
        if bos is not None:
            tokens = [int(bos), *tokens]
        if len(tokens) >= 2:
            windows.append(torch.tensor(tokens, dtype=torch.long))
    return windows


def general_perplexity(
    model: Any,
    tokenizer: Any,
    *,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
    max_tokens: int | None = None,
    window: int = DEFAULT_WINDOW,
    batch_size: int = 8,
) -> float:
    """Perplexity on the bundled general English text, in windows of the model's context.

    The window is ``min(window, model.cfg.n_ctx)`` tokens, BOS included.
    """
    n_ctx = getattr(model.cfg, "n_ctx", None) or window
    windows = text_windows(tokenizer, window=min(window, int(n_ctx)), max_tokens=max_tokens)
    return perplexity(model, windows, fwd_hooks=fwd_hooks, batch_size=batch_size)


# ---- metrics of PII records: token metrics and exposure ----


@dataclass(frozen=True)
class ExposureConfig:
    """Settings of exposure and MRR.

    Attributes:
        n_candidates: candidate strings per PII item, drawn with
            :func:`tl_privacy.data.synthetic.candidates_for`. When fewer distinct candidates
            exist for an item (a 7-digit phone number has 99), the count is halved until
            drawing succeeds, and the item's ``n_candidates`` records how many were used.
        seed: seed of the candidate draws. Each item gets a ``random.Random`` seeded with the
            seed, its type and its text, so its candidates do not depend on the other items.
        tie_tolerance: candidates within this many nats of the true score count as ties.
        max_job_nodes: trie nodes per scoring job; larger tries are split into jobs of
            contiguous candidates with tries of about this size.
        max_row_nodes: trie nodes per batch row in whole tries (``trie_mode`` below). Jobs
            share a row (and its cached keys and values) up to this many nodes to run, which
            bounds the cache and the attention cost of a row. A node's keys and values stay
            in the cache while a node below it may still run, so each query attends to up
            to this many columns besides the prefixes. Level by level, ``"auto"`` keeps at
            most this many trie columns per record of a row. On SmolLM2 with nothing
            pruned (80 held-out items, 100 candidates each, bfloat16, 2 CPU threads, in
            passes of 512 nodes) rows of 512 nodes took 93 s against 146 s with 2,048 and
            125 s with 256 (more rows, smaller passes).
        records_per_row: records whose jobs share one batch row while tries run level by
            level. The row contains the records' cached keys and values side by side. Where
            the model prefers the true PII, few nodes survive each level. Rows of one record
            would then run mostly padding, so rows of several records fill the passes.
            Models whose cache is not a transformers ``DynamicCache`` of plain layers get
            rows of one record.
        rows_per_pass: batch rows scored side by side in one forward pass.
        max_query_tokens: trie nodes run in one forward pass, over all its rows. Its logits
            take ``max_query_tokens * d_vocab`` floats (400 MB for 2,048 SmolLM2 nodes).
        trie_mode: how trie levels are grouped into passes. ``"levels"`` runs each trie
            level by level and prunes as it goes, with one pass or more per level.
            ``"whole"`` runs everything below the first level's survivors in passes of up
            to ``max_query_tokens`` nodes, without further pruning. ``"auto"`` switches a
            batch of rows from levels to whole tries at the first level where that is
            predicted to be cheaper, where at least ``WHOLE_SURVIVOR_SHARE`` (90%) of the
            level's candidate nodes survive, or where its rows keep more trie columns than
            ``max_row_nodes`` per record. Pruning pays where the model prefers the true PII (a
            memorizing model). Where little is pruned (a model that finds the PII
            unlikely), the per-level passes cost more than the nodes they skip, and the
            columns kept for the next level make each query attend to thousands. Whole
            tries run in new rows bounded by ``max_row_nodes``, where the ancestors of the
            nodes to run go again for their keys and values.
        pass_cost_nodes: the fixed cost of one forward pass, in trie nodes, for ``"auto"``.
            Level by level is predicted to run each node whose surviving ancestor is far
            enough above the bound to cover the node's depth below it, at the mean nats
            per token just scored, plus one pass per level. Whole tries run every node
            below the survivors, in few passes. ``benchmarks/exposure.py`` times the modes
            on the demo's model, with and without ablated neuron sets. On SmolLM2 with
            2 CPU threads, a pass of a few nodes costs about as much as 100 to 200 nodes
            in a large pass (an estimate from timing single passes).
        use_kv_cache: score tries behind a KV cache where the model supports it.
        max_items_per_type: rank only the first this many items of each PII type (in
            record order), or all with None; the others get no rank. Exposure costs about
            ``n_candidates`` times the PII length in tokens per item, so this bounds it.
    """

    n_candidates: int = DEFAULT_N_CANDIDATES
    seed: int = 0
    tie_tolerance: float = 0.0
    max_job_nodes: int = 512
    max_row_nodes: int = 512
    records_per_row: int = 4
    rows_per_pass: int = 8
    max_query_tokens: int = 2048
    trie_mode: Literal["auto", "levels", "whole"] = "auto"
    pass_cost_nodes: float = 160.0
    use_kv_cache: bool = True
    max_items_per_type: int | None = None

    def __post_init__(self) -> None:
        if self.n_candidates < 1:
            raise ValueError(f"n_candidates must be at least 1, got {self.n_candidates}.")
        if self.tie_tolerance < 0:
            raise ValueError(f"tie_tolerance must be >= 0, got {self.tie_tolerance}.")
        if self.trie_mode not in ("auto", "levels", "whole"):
            raise ValueError(
                f"trie_mode must be 'auto', 'levels' or 'whole', got {self.trie_mode!r}."
            )
        if not self.pass_cost_nodes >= 0:
            raise ValueError(f"pass_cost_nodes must be >= 0, got {self.pass_cost_nodes}.")
        for name in (
            "max_job_nodes",
            "max_row_nodes",
            "records_per_row",
            "rows_per_pass",
            "max_query_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_items_per_type is not None and self.max_items_per_type < 1:
            raise ValueError(
                f"max_items_per_type must be at least 1 or None, got {self.max_items_per_type}."
            )


@dataclass(frozen=True)
class ItemExposure:
    """The rank of one PII item among its candidates.

    ``log_likelihood`` is the model's log-probability of the PII tokens given the prefix, in
    nats. ``rank`` and ``exposure`` are None for a type without a candidate generator and for
    items beyond ``ExposureConfig.max_items_per_type``.
    """

    record_index: int
    span_index: int
    type: str
    log_likelihood: float
    rank: int | None
    n_candidates: int
    exposure: float | None


@dataclass(frozen=True)
class ExposureResult:
    """Exposure and MRR of a list of PII items, with per-item ranks."""

    items: list[ItemExposure]

    @property
    def ranked(self) -> list[ItemExposure]:
        """The items that have a rank."""
        return [item for item in self.items if item.rank is not None]

    @property
    def ranks(self) -> list[int]:
        return [int(item.rank) for item in self.ranked]

    @property
    def distribution(self) -> list[float]:
        """Exposure of each ranked item, in bits, in item order."""
        return [float(item.exposure) for item in self.ranked]

    @property
    def exposure_mean(self) -> float:
        values = self.distribution
        return sum(values) / len(values) if values else math.nan

    @property
    def mrr(self) -> float:
        return mean_reciprocal_rank(self.ranks)

    def by_type(self) -> dict[str, dict[str, float]]:
        """Exposure mean, MRR and counts per PII type, in order of first appearance."""
        types = dict.fromkeys(item.type for item in self.items)
        result = {}
        for pii_type in types:
            subset = ExposureResult([item for item in self.items if item.type == pii_type])
            ranked = subset.ranked
            result[pii_type] = {
                "n_items": len(subset.items),
                "exposure_mean": subset.exposure_mean,
                "mrr": subset.mrr,
                "n_candidates": (
                    sum(item.n_candidates for item in ranked) / len(ranked) if ranked else 0
                ),
            }
        return result

    def to_dict(self) -> dict[str, Any]:
        return {
            "exposure_mean": self.exposure_mean,
            "mrr": self.mrr,
            "distribution": self.distribution,
            "by_type": self.by_type(),
            "items": [asdict(item) for item in self.items],
        }


@dataclass
class TokenMetrics:
    """Teacher-forced metrics over the tokens of a set of records.

    Attributes:
        pii_token_accuracy: share of PII tokens that are the argmax prediction.
        pii_cross_entropy: mean NLL of the PII tokens, in nats.
        perplexity: ``exp`` of the mean NLL of the real non-PII tokens (natural log).
        n_pii_tokens: PII tokens counted (of the selected types).
        n_other_tokens: non-PII tokens counted.
        by_type: per PII type, ``{"pii_token_accuracy", "pii_cross_entropy", "n_tokens"}``.
    """

    pii_token_accuracy: float
    pii_cross_entropy: float
    perplexity: float
    n_pii_tokens: int
    n_other_tokens: int
    by_type: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemScore:
    """Teacher-forced scores of one PII item in its record.

    ``log_likelihood`` is the log-probability of the PII tokens given the prefix, in nats.
    ``exact`` is True when the argmax prediction is the true token at every PII position,
    which is exactly when greedy decoding from the prefix reproduces the PII tokens (up to
    ties between logits). ``greedy_ids`` (``[new_pos]``, when :func:`record_metrics` ran
    with ``greedy=True``) are the tokens greedy decoding from the prefix produces: as many
    as the PII has, cut before the first EOS.
    """

    log_likelihood: float
    exact: bool
    greedy_ids: Tensor | None = None


@dataclass
class RecordMetrics:
    """Token metrics, per-item scores, exposure (None when skipped) and the PII items of a
    list of records; ``item_scores[i]`` belongs to ``items[i]``."""

    tokens: TokenMetrics
    exposure: ExposureResult | None
    items: list[PIIItem]
    item_scores: list[ItemScore]


def record_metrics(
    model: Any,
    tokenizer: Any,
    records: Sequence[PIIRecord],
    *,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
    batch_size: int = 8,
    types: Sequence[str] | None = None,
    exposure: ExposureConfig | None = None,
    greedy: bool = False,
    decode_batch_size: int = 32,
) -> RecordMetrics:
    """Measure token metrics and, with ``exposure``, exposure and MRR of ``records``.

    One teacher-forced forward pass per batch of records gives the PII token accuracy and
    cross-entropy, the non-PII perplexity, each PII item's log-likelihood and teacher-forced
    exact match, and its candidates' first-token scores. The remaining candidate tokens are
    scored behind that pass (see the module docstring).

    Args:
        records: records with PII spans; each is tokenized with BOS, as in
            :func:`tl_privacy.data.tokenization.make_batches`.
        types: PII types to measure (default all); tokens of other types count neither as
            PII nor towards perplexity.
        exposure: exposure settings, or None to skip exposure and MRR.
        greedy: also decode each PII item greedily from its prefix (``ItemScore.greedy_ids``),
            starting from the record's own pass (see :class:`_GreedyDecoder`).
        decode_batch_size: prefixes decoded side by side where items continue without a
            tree-capable KV cache.
    """
    if not records:
        raise ValueError("record_metrics needs at least one record, got none.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    type_names = type_names_for(records)
    selected = _selected_type_ids(types, type_names)
    items = pii_items(tokenizer, records, types=types)
    items_by_record: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        items_by_record.setdefault(item.record_index, []).append(index)

    plans = _exposure_plans(tokenizer, items, exposure) if exposure is not None else None
    batches = make_batches(tokenizer, records, batch_size, type_names=type_names)
    counts = _TokenCounts(type_names)
    item_exposures: dict[int, ItemExposure] = {}
    item_scores: dict[int, ItemScore] = {}
    device = _model_device(model)
    cache_mode = None
    if exposure is not None and exposure.use_kv_cache and plans:
        cache_mode = tree_cache_mode(model)
    if greedy:
        cache_mode = tree_cache_mode(model)
    eos_token_id = getattr(tokenizer, "eos_token_id", None)

    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(attached(model, list(fwd_hooks)))
        if cache_mode == "renamed":
            stack.enter_context(_cache_kwarg_renamed(model))
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            if cache_mode is not None:
                logits, cache = _forward_with_cache(model, input_ids, attention_mask)
            else:
                logits, cache = model_logits(model, input_ids, attention_mask), None
            counts.add(logits, batch, selected)

            rows = {int(record): row for row, record in enumerate(batch["record_index"])}
            batch_items = [index for record in rows for index in items_by_record.get(record, [])]
            paths = {
                index: _true_path(logits, input_ids, rows[items[index].record_index], items[index])
                for index in batch_items
            }
            decoded = {}
            if greedy:
                decoder = _GreedyDecoder(
                    model, cache, logits, rows, items, eos_token_id, decode_batch_size
                )
                decoded = decoder.decode(batch_items)
            for index, path in paths.items():
                item_scores[index] = ItemScore(
                    log_likelihood=path.score, exact=path.exact, greedy_ids=decoded.get(index)
                )
            if plans is None:
                continue
            scorer = _TrieScorer(model, cache, input_ids, rows, items, paths, plans, exposure)
            item_exposures.update(scorer.score(batch_items))

    exposure_result = None
    if plans is not None:
        exposure_result = ExposureResult([item_exposures[i] for i in range(len(items))])
    return RecordMetrics(
        tokens=counts.result(),
        exposure=exposure_result,
        items=items,
        item_scores=[item_scores[i] for i in range(len(items))],
    )


def exposure_scores(
    model: Any,
    tokenizer: Any,
    records: Sequence[PIIRecord],
    *,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
    config: ExposureConfig | None = None,
    types: Sequence[str] | None = None,
    batch_size: int = 8,
) -> ExposureResult:
    """Exposure and MRR of the PII items of ``records`` (see :func:`record_metrics`)."""
    result = record_metrics(
        model,
        tokenizer,
        records,
        fwd_hooks=fwd_hooks,
        batch_size=batch_size,
        types=types,
        exposure=config or ExposureConfig(),
    )
    assert result.exposure is not None
    return result.exposure


def _selected_type_ids(types: Sequence[str] | None, type_names: Sequence[str]) -> Tensor | None:
    if types is None:
        return None
    if isinstance(types, str):
        types = (types,)
    unknown = [t for t in types if t not in type_names]
    if unknown:
        raise ValueError(
            f"types {unknown} do not occur in the records' spans, which have {list(type_names)}."
        )
    return torch.tensor([type_names.index(t) for t in types])


class _TokenCounts:
    """Sums of teacher-forced token losses and hits, accumulated over batches."""

    def __init__(self, type_names: Sequence[str]) -> None:
        self.type_names = tuple(type_names)
        n_types = len(self.type_names)
        self.pii_nll = torch.zeros(n_types, dtype=torch.float64)
        self.pii_hits = torch.zeros(n_types, dtype=torch.float64)
        self.pii_count = torch.zeros(n_types, dtype=torch.float64)
        self.other_nll = 0.0
        self.other_count = 0

    def add(self, logits: Tensor, batch: dict[str, Tensor], selected: Tensor | None) -> None:
        input_ids = batch["input_ids"].to(logits.device)
        attention_mask = batch["attention_mask"].to(logits.device)
        nll, valid = _nll_from_logits(logits, input_ids, attention_mask)
        nll, valid = nll.cpu().double(), valid.cpu()
        hits = (logits[:, :-1].argmax(-1) == input_ids[:, 1:]).cpu()

        pii = batch["pii_mask"][:, 1:].bool() & valid
        type_ids = batch["pii_type_ids"][:, 1:]
        counted = pii if selected is None else pii & torch.isin(type_ids, selected)
        ids = type_ids[counted]
        self.pii_nll.index_add_(0, ids, nll[counted])
        self.pii_hits.index_add_(0, ids, hits[counted].double())
        self.pii_count.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))

        other = valid & ~pii
        self.other_nll += float(nll[other].sum())
        self.other_count += int(other.sum())

    def result(self) -> TokenMetrics:
        total = float(self.pii_count.sum())
        by_type = {}
        for index, name in enumerate(self.type_names):
            count = float(self.pii_count[index])
            if count == 0:
                continue
            by_type[name] = {
                "pii_token_accuracy": float(self.pii_hits[index]) / count,
                "pii_cross_entropy": float(self.pii_nll[index]) / count,
                "n_tokens": int(count),
            }
        other_mean = self.other_nll / self.other_count if self.other_count else math.nan
        return TokenMetrics(
            pii_token_accuracy=float(self.pii_hits.sum()) / total if total else math.nan,
            pii_cross_entropy=float(self.pii_nll.sum()) / total if total else math.nan,
            perplexity=math.exp(other_mean) if self.other_count else math.nan,
            n_pii_tokens=int(total),
            n_other_tokens=self.other_count,
            by_type=by_type,
        )


# ---- exposure: candidate tries ----


@dataclass(frozen=True)
class _TrieJob:
    """A token trie of the true PII and some of its candidates; hook-independent.

    Node ``i`` holds ``tokens[i]`` at ``depths[i]`` (1 = first PII token) below ``parents[i]``
    (-1 = the item's prefix). ``true_depth[i]`` is ``depths[i]`` for nodes on the true PII's
    path and 0 elsewhere; those nodes take their logits from the record's own forward pass.
    ``levels[d - 1]`` lists the nodes at depth ``d``. ``terminals[j]`` is the node where
    candidate ``j`` of this job ends.
    """

    tokens: Tensor
    parents: Tensor
    depths: Tensor
    true_depth: Tensor
    has_children: Tensor
    levels: tuple[Tensor, ...]
    terminals: Tensor

    @property
    def n_nodes(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class _ExposurePlan:
    """The candidate tries of one PII item, split into jobs."""

    n_candidates: int
    jobs: tuple[_TrieJob, ...]


# Candidate tries per (tokenizer, item, settings). Drawing candidates is slow (about 30 s for
# 160 items x 1,000 candidates on 2 CPU cores), and the same tries serve every hook set.
_PLAN_CACHE: OrderedDict[tuple, tuple[Any, _ExposurePlan | None]] = OrderedDict()
_PLAN_CACHE_SIZE = 4096


def _exposure_plans(
    tokenizer: Any, items: Sequence[PIIItem], config: ExposureConfig
) -> dict[int, _ExposurePlan]:
    plans = {}
    skipped: set[str] = set()
    per_type: dict[str, int] = {}
    for index, item in enumerate(items):
        if item.type not in CANDIDATE_TYPES:
            skipped.add(item.type)
            continue
        per_type[item.type] = per_type.get(item.type, 0) + 1
        if (
            config.max_items_per_type is not None
            and per_type[item.type] > config.max_items_per_type
        ):
            continue
        key = (
            id(tokenizer),
            item.type,
            item.text,
            tuple(item.target_ids.tolist()),
            config.n_candidates,
            config.seed,
            config.max_job_nodes,
        )
        cached = _PLAN_CACHE.get(key)
        # The tokenizer is kept in the entry so its id cannot be reused by another object.
        if cached is None or cached[0] is not tokenizer:
            cached = (tokenizer, _plan_item(tokenizer, item, config))
            _PLAN_CACHE[key] = cached
            while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
                _PLAN_CACHE.popitem(last=False)
        else:
            _PLAN_CACHE.move_to_end(key)
        plans[index] = cached[1]
    if skipped:
        logger.info("exposure: no candidate generator for PII types %s; skipped", sorted(skipped))
    return plans


def _plan_item(tokenizer: Any, item: PIIItem, config: ExposureConfig) -> _ExposurePlan:
    strings = _draw_candidates(item, config.n_candidates, config.seed)
    sequences = _candidate_token_sequences(tokenizer, item, strings)
    true_sequence = tuple(int(token) for token in item.target_ids)
    jobs = tuple(
        _build_trie(true_sequence, group)
        for group in _split_by_nodes(sorted(sequences), config.max_job_nodes)
    )
    return _ExposurePlan(n_candidates=len(sequences), jobs=jobs)


def _draw_candidates(item: PIIItem, n: int, seed: int) -> list[str]:
    # A string seed is hashed with SHA-512 by random.Random, so draws match across processes.
    rng_seed = f"{seed}|{item.type}|{item.text}"
    count = n
    while True:
        try:
            return candidates_for(item.text, item.type, count, random.Random(rng_seed))
        except ValueError:
            if count == 1:
                raise
            count = max(1, count // 2)
            logger.info(
                "exposure: fewer than %d candidates exist for a %s item; trying %d",
                count * 2,
                item.type,
                count,
            )


def _candidate_token_sequences(
    tokenizer: Any, item: PIIItem, strings: Sequence[str]
) -> list[tuple[int, ...]]:
    """Tokenize each candidate as it would appear in place of the PII in the record.

    The decoded target tokens may include a leading space (merged into the first PII token)
    or characters after the span; the candidate replaces only the PII text inside them.
    """
    target = tokenizer.decode(item.target_ids.tolist(), clean_up_tokenization_spaces=False)
    start = target.find(item.text)
    if start < 0:
        raise ValueError(
            f"the decoded tokens of a {item.type} item (record {item.record_index}, span "
            f"{item.span_index}) do not contain its PII text, so candidates cannot replace it; "
            "the tokenizer's decode must reproduce the text"
        )
    before, after = target[:start], target[start + len(item.text) :]
    texts = [before + candidate + after for candidate in strings]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [tuple(int(token) for token in ids) for ids in encoded if ids]


def _split_by_nodes(
    sequences: Sequence[tuple[int, ...]], max_nodes: int
) -> list[list[tuple[int, ...]]]:
    """Cut sorted sequences into contiguous groups whose tries have about ``max_nodes`` nodes.

    Sorted neighbours share the longest prefixes, so contiguous groups lose little sharing.
    """
    groups: list[list[tuple[int, ...]]] = []
    current: list[tuple[int, ...]] = []
    nodes = 0
    previous: tuple[int, ...] = ()
    for sequence in sequences:
        shared = _common_prefix(previous, sequence) if current else 0
        new_nodes = len(sequence) - shared
        if current and nodes + new_nodes > max_nodes:
            groups.append(current)
            current, nodes, shared = [], 0, 0
            new_nodes = len(sequence)
        current.append(sequence)
        nodes += new_nodes
        previous = sequence
    if current:
        groups.append(current)
    return groups


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def _build_trie(true_sequence: tuple[int, ...], candidates: Sequence[tuple[int, ...]]) -> _TrieJob:
    index: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []

    def insert(sequence: tuple[int, ...]) -> int:
        node = -1
        for depth, token in enumerate(sequence, start=1):
            key = (node, token)
            child = index.get(key)
            if child is None:
                child = len(tokens)
                index[key] = child
                tokens.append(token)
                parents.append(node)
                depths.append(depth)
            node = child
        return node

    insert(true_sequence)
    n_true = len(tokens)
    terminals = [insert(sequence) for sequence in candidates]

    parent_tensor = torch.tensor(parents, dtype=torch.long)
    depth_tensor = torch.tensor(depths, dtype=torch.long)
    has_children = torch.zeros(len(tokens), dtype=torch.bool)
    has_children[parent_tensor[parent_tensor >= 0]] = True
    true_depth = torch.zeros(len(tokens), dtype=torch.long)
    true_depth[:n_true] = depth_tensor[:n_true]
    max_depth = int(depth_tensor.max())
    levels = tuple((depth_tensor == d).nonzero().flatten() for d in range(1, max_depth + 1))
    return _TrieJob(
        tokens=torch.tensor(tokens, dtype=torch.long),
        parents=parent_tensor,
        depths=depth_tensor,
        true_depth=true_depth,
        has_children=has_children,
        levels=levels,
        terminals=torch.tensor(terminals, dtype=torch.long),
    )


# ---- exposure: scoring tries behind the record's forward pass ----


@dataclass(frozen=True)
class _TruePath:
    """The true PII's log-softmax rows (from ``prefix_len - 1`` to the last PII token, so
    ``[target_len + 1, d_vocab]``), its log-likelihood and its teacher-forced exact match."""

    log_probs: Tensor
    score: float
    exact: bool


def _true_path(logits: Tensor, input_ids: Tensor, row: int, item: PIIItem) -> _TruePath:
    prefix_len, target_len = len(item.prefix_ids), len(item.target_ids)
    record_tokens = input_ids[row, prefix_len : prefix_len + target_len].cpu()
    if not torch.equal(record_tokens, item.target_ids):
        raise RuntimeError(
            f"the PII tokens of record {item.record_index}, span {item.span_index} differ "
            "between pii_items and make_batches; both must tokenize records the same way"
        )
    columns = logits[row, prefix_len - 1 : prefix_len + target_len].float()
    log_probs = F.log_softmax(columns, dim=-1).cpu()
    predicted = columns[:target_len].argmax(-1).cpu()

    # Summed one token at a time in float32, exactly as the trie sums candidate paths.
    score = torch.zeros((), dtype=torch.float32)
    for depth, token in enumerate(item.target_ids.tolist()):
        score = score + log_probs[depth, token]
    exact = bool(torch.equal(predicted, item.target_ids))
    return _TruePath(log_probs=log_probs, score=float(score), exact=exact)


@dataclass
class _JobState:
    """One job being scored: its trie, the record row it extends and running scores."""

    job: _TrieJob
    item: int
    row: int
    prefix_len: int
    true_log_probs: Tensor  # [target_len + 1, d_vocab], log-softmax at prefix_len - 1 onwards
    bound: float
    cum: Tensor  # [n_nodes] log-likelihood of each node's path; -inf when pruned
    cols: Tensor  # [n_nodes] cache column of each node that has keys and values, else -1
    # Log-probability of each node's token after its parent's path; NaN until its parent
    # runs. Filled only while the job runs whole (``whole_from`` is not None).
    edge: Tensor
    whole_from: int | None = None  # depth from which the rest of the trie runs unpruned
    offset: int = 0  # cache column where the job's record starts in its runner's row


class _TrieScorer:
    """Scorer of the candidate tries of the PII items of one record batch."""

    def __init__(
        self,
        model: Any,
        cache: Any,
        input_ids: Tensor,
        rows: dict[int, int],
        items: Sequence[PIIItem],
        paths: dict[int, _TruePath],
        plans: dict[int, _ExposurePlan],
        config: ExposureConfig,
    ) -> None:
        self.model = model
        self.cache = cache
        self.input_ids = input_ids
        self.rows = rows
        self.items = items
        self.paths = paths
        self.plans = plans
        self.config = config
        # Rows of several records need cache columns that can be selected freely.
        plain = cache is not None and _plain_cache_layers(cache) is not None
        self.records_per_row = config.records_per_row if plain else 1

    def score(self, item_indices: Sequence[int]) -> dict[int, ItemExposure]:
        results = {}
        states: list[_JobState] = []
        for index in item_indices:
            plan = self.plans.get(index)
            if plan is None:
                continue
            path = self.paths[index]
            for job in plan.jobs:
                states.append(self._new_state(index, job, path.log_probs, path.score))

        higher = dict.fromkeys(item_indices, 0)
        # Rows of similar size waste little padding side by side.
        rows = sorted(self._level_rows(states), key=lambda row: sum(s.job.n_nodes for s in row))
        for start in range(0, len(rows), self.config.rows_per_pass):
            group = rows[start : start + self.config.rows_per_pass]
            self._score_group(group)
            for state in (state for row in group for state in row):
                finals = state.cum[state.job.terminals]
                higher[state.item] += int((finals >= state.bound).sum())

        for index in item_indices:
            item = self.items[index]
            plan = self.plans.get(index)
            rank = None if plan is None else 1 + higher[index]
            n_candidates = 0 if plan is None else plan.n_candidates
            results[index] = ItemExposure(
                record_index=item.record_index,
                span_index=item.span_index,
                type=item.type,
                log_likelihood=self.paths[index].score,
                rank=rank,
                n_candidates=n_candidates,
                exposure=None if rank is None else exposure_from_rank(rank, n_candidates),
            )
        return results

    def _level_rows(self, states: list[_JobState]) -> list[list[_JobState]]:
        """Pack the jobs of ``records_per_row`` records into each batch row, for scoring
        level by level.

        A row contains the cached keys and values of its records side by side, and all their
        jobs extend them. Where the model prefers the true PII, few nodes survive each
        level, so rows of several records fill the passes that rows of single records would
        mostly pad. Jobs that switch to whole tries leave these rows for rows of a bounded
        size (see :meth:`_score_whole`).
        """
        by_record: dict[int, list[_JobState]] = {}
        for state in states:
            by_record.setdefault(state.row, []).append(state)
        records = list(by_record.values())
        per_row = self.records_per_row
        return [
            [state for record_states in records[start : start + per_row] for state in record_states]
            for start in range(0, len(records), per_row)
        ]

    def _whole_rows(self, states: list[_JobState], sizes: dict[int, int]) -> list[list[_JobState]]:
        """Pack jobs into batch rows of at most ``max_row_nodes`` nodes to run and at most
        ``records_per_row`` records, for whole tries. ``sizes`` maps ``id(state)`` to its
        node count.

        A node's keys and values stay in the cache while a node below it may still run. So
        the node bound also bounds the columns each query attends to besides the prefixes.
        """
        rows: list[list[_JobState]] = []
        row: list[_JobState] = []
        records: set[int] = set()
        nodes = 0
        for state in sorted(states, key=lambda state: state.row):
            size = sizes[id(state)]
            new_record = state.row not in records
            full = nodes + size > self.config.max_row_nodes
            if row and (full or (new_record and len(records) == self.records_per_row)):
                rows.append(row)
                row, records, nodes = [], set(), 0
            row.append(state)
            records.add(state.row)
            nodes += size
        if row:
            rows.append(row)
        return rows

    def _new_state(
        self, index: int, job: _TrieJob, log_probs: Tensor, true_score: float
    ) -> _JobState:
        item = self.items[index]
        prefix_len = len(item.prefix_ids)
        return _JobState(
            job=job,
            item=index,
            row=self.rows[item.record_index],
            prefix_len=prefix_len,
            true_log_probs=log_probs,
            bound=true_score - self.config.tie_tolerance,
            cum=torch.full((job.n_nodes,), -math.inf, dtype=torch.float32),
            # Set by each runner that takes the job (see _runner_cache).
            cols=torch.full((job.n_nodes,), -1, dtype=torch.long),
            edge=torch.full((job.n_nodes,), math.nan, dtype=torch.float32),
        )

    def _score_group(self, rows: list[list[_JobState]]) -> None:
        states = [state for row in rows for state in row]
        for state in states:
            first = state.job.levels[0]
            state.cum[first] = state.true_log_probs[0, state.job.tokens[first]]
        if self.cache is None:
            for state in states:
                self._score_whole_candidates(state)
            return

        runner = None
        max_depth = max(len(state.job.levels) for state in states)
        for depth in range(1, max_depth):
            if self._whole_from_here(states, depth) or self._crowded(runner):
                # The whole tries build their own caches, so this one can go first.
                runner = None
                self._score_whole(states, depth)
                return
            requests = [self._request(state, depth) for state in states]
            if not any(len(request) for request in requests):
                continue
            if runner is None:
                runner = _CachedRunner(self.model, self.cache, self.config, rows)
            for position, nodes, logits in runner.run(requests):
                state = states[position]
                self._extend(state, *_child_log_probs(logits, state.job, nodes))

    def _crowded(self, runner: _CachedRunner | None) -> bool:
        """Return whether ``runner``'s rows keep more trie columns than ``max_row_nodes``
        per record of a row, after dropping those no node still needs, in
        ``trie_mode="auto"``.

        Every query attends to every column of its row, so where little is pruned, level by
        level in rows of several records costs more in attention than whole tries in rows
        of a bounded size.
        """
        if runner is None or self.config.trie_mode != "auto":
            return False
        runner._compact()
        bound = self.config.max_row_nodes * self.records_per_row
        return runner.cache_len - runner.record_len > bound

    def _score_whole(self, states: list[_JobState], depth: int) -> None:
        """Run every node below the level-``depth`` survivors of ``states`` without pruning,
        and sum the paths.

        The jobs move to rows of a bounded size (:meth:`_whole_rows`) with fresh caches. The
        nodes scored level by level so far have no keys and values there, so the ancestors
        of the nodes to run (those off the true PII's path) run again first.
        """
        requests = {}
        for state in states:
            request = self._whole_request(state, depth)
            if request is not None:
                requests[id(state)] = request
        pending = [state for state in states if id(state) in requests]
        sizes = {key: len(request) for key, request in requests.items()}
        rows = sorted(
            self._whole_rows(pending, sizes), key=lambda row: sum(sizes[id(s)] for s in row)
        )
        for start in range(0, len(rows), self.config.rows_per_pass):
            group = rows[start : start + self.config.rows_per_pass]
            group_states = [state for row in group for state in row]
            runner = _CachedRunner(self.model, self.cache, self.config, group)
            group_requests = [requests[id(state)] for state in group_states]
            for position, nodes, logits in runner.run(group_requests):
                state = group_states[position]
                children, log_probs = _child_log_probs(logits, state.job, nodes)
                state.edge[children] = log_probs
        for state in pending:
            self._sum_whole(state, depth)

    @staticmethod
    def _whole_request(state: _JobState, depth: int) -> Tensor | None:
        """Return the nodes to run for ``state``'s job as a whole trie below level ``depth``,
        or None when the job is done: everything below the survivors that has children,
        and their ancestors off the true PII's path, in depth order."""
        job = state.job
        if depth >= len(job.levels):
            return None
        state.whole_from = depth
        _, surviving = _survivors(state, depth)
        below = _runnable_below(job, surviving)
        # Only the nodes that run need their ancestors' keys and values, not leaf survivors.
        ancestors = torch.zeros(job.n_nodes, dtype=torch.bool)
        parents = job.parents[below]
        while len(parents):
            parents = parents[parents >= 0]
            ancestors[parents] = True
            parents = job.parents[parents]
        ancestors[below] = False
        above = (ancestors & (job.true_depth == 0)).nonzero().flatten()
        nodes = torch.cat([above, below])
        return nodes[torch.argsort(job.depths[nodes], stable=True)]

    def _whole_from_here(self, states: list[_JobState], depth: int) -> bool:
        """Return whether the group's jobs should run whole below level ``depth`` (see
        ``ExposureConfig.trie_mode`` and ``pass_cost_nodes``)."""
        mode = self.config.trie_mode
        if mode != "auto":
            return mode == "whole"
        # Checked first because it is cheap and, where it holds, the prediction is not needed.
        if _survivor_share(states, depth) >= WHOLE_SURVIVOR_SHARE:
            return True

        splits = [(state, _level_split(state, depth)) for state in states]
        splits = [(state, split) for state, split in splits if split is not None]
        steps = torch.cat([split[0] for _, split in splits]) if splits else torch.empty(0)
        if not len(steps):
            return False
        # Nats a candidate loses per token, from the tokens just scored.
        cost_per_token = max(float(-steps.mean()), 1e-3)
        predicted_nodes, predicted_levels, total = 0, set(), 0
        for state, (_, margins, below) in splits:
            offsets = state.job.depths[below] - depth
            reached = margins[below] >= offsets * cost_per_token
            predicted_nodes += int(reached.sum())
            predicted_levels.update(offsets[reached].tolist())
            total += len(below)
        pass_cost = self.config.pass_cost_nodes
        by_levels = predicted_nodes + pass_cost * len(predicted_levels)
        whole = total + pass_cost * math.ceil(total / self.config.max_query_tokens)
        return whole < by_levels

    def _request(self, state: _JobState, depth: int) -> Tensor:
        """Return the nodes of ``state``'s job to run for trie level ``depth``: the surviving
        nodes at ``depth`` that have children and are not on the true PII's path. Those on
        it take their children's scores from the record's own pass here."""
        job = state.job
        if depth >= len(job.levels):
            return torch.empty(0, dtype=torch.long)
        _, surviving = _survivors(state, depth)
        alive = surviving[job.has_children[surviving]]
        true_nodes = alive[job.true_depth[alive] > 0]
        if len(true_nodes):
            rows = state.true_log_probs[job.true_depth[true_nodes]]
            self._extend(state, *_child_log_probs(rows, job, true_nodes, normalized=True))
        return alive[job.true_depth[alive] == 0]

    def _score_whole_candidates(self, state: _JobState) -> None:
        """Score each candidate as one ``prefix + candidate`` sequence; for models without a
        usable KV cache, where running trie levels would re-run the prefix for every node."""
        job = state.job
        prefix = self.input_ids[state.row, : state.prefix_len]
        lengths = job.depths[job.terminals]
        per_pass = max(1, _UNCACHED_TOKENS_PER_PASS // (state.prefix_len + int(lengths.max())))
        for start in range(0, len(job.terminals), per_pass):
            terminals = job.terminals[start : start + per_pass]
            paths = _paths_to(job, terminals)
            sequences = [torch.cat([prefix.cpu(), path]) for path in paths]
            input_ids, attention_mask = _pad(sequences, _model_pad_id(self.model), "right")
            device = self.input_ids.device
            logits = model_logits(self.model, input_ids.to(device), attention_mask.to(device))
            nll, _ = _nll_from_logits(logits, input_ids.to(device), attention_mask.to(device))
            # Row i's candidate tokens are predicted at positions prefix_len - 1 onwards.
            for row, (terminal, path) in enumerate(zip(terminals, paths, strict=True)):
                first = state.prefix_len - 1
                losses = nll[row, first : first + len(path)].cpu()
                state.cum[terminal] = -losses.sum()

    @staticmethod
    def _extend(state: _JobState, children: Tensor, log_probs: Tensor) -> None:
        """Score ``children`` from their parents' scores and their own log-probabilities."""
        job = state.job
        state.cum[children] = state.cum[job.parents[children]] + log_probs

    @staticmethod
    def _sum_whole(state: _JobState, depth: int) -> None:
        """Sum the edge log-probabilities below level ``depth`` into path scores, top down.

        Nodes below a pruned node keep -inf, as level-by-level scoring leaves them. Nodes
        that fall below the bound on the way get their real, lower score. Neither counts
        as higher than the true PII.
        """
        job = state.job
        for level in job.levels[depth:]:
            parents = job.parents[level]
            on_true = job.true_depth[parents] > 0
            if on_true.any():
                true_rows = state.true_log_probs[job.true_depth[parents[on_true]]]
                state.edge[level[on_true]] = (
                    true_rows.gather(1, job.tokens[level[on_true]].unsqueeze(1)).squeeze(1).float()
                )
            reached = (state.cum[parents] > -math.inf) & ~state.edge[level].isnan()
            state.cum[level[reached]] = state.cum[parents[reached]] + state.edge[level[reached]]


_UNCACHED_TOKENS_PER_PASS = 4096
"""Tokens per forward pass when candidates are scored without a KV cache."""


def _child_log_probs(
    logits: Float[Tensor, "n d_vocab"],
    job: _TrieJob,
    parents: Tensor,
    normalized: bool = False,
) -> tuple[Int[Tensor, " n_children"], Float[Tensor, " n_children"]]:
    """Return the children of ``parents`` and the log-probability of each child's token
    (float32, on the CPU), where ``logits`` row ``i`` belongs to ``parents[i]``.

    Only the children's entries and each row's log-sum-exp are read, instead of writing a
    full log-softmax over the vocabulary. ``normalized`` rows are log-probabilities already
    (the true PII's rows) and are read as they are.
    """
    row_of = torch.full((job.n_nodes,), -1, dtype=torch.long)
    row_of[parents] = torch.arange(len(parents))
    children = (job.parents >= 0).nonzero().flatten()
    children = children[row_of[job.parents[children]] >= 0]

    rows = row_of[job.parents[children]].to(logits.device)
    tokens = job.tokens[children].to(logits.device)
    picked = logits[rows, tokens].float()
    if normalized:
        return children, picked.cpu()
    # float64 logits give float64 sums; the scores are float32 like the rest of the trie.
    return children, (picked - logsumexp_float32(logits)[rows]).float().cpu()


def _subtree(job: _TrieJob, roots: Tensor) -> Tensor:
    """Return ``roots`` and all their descendants, sorted by depth."""
    inside = torch.zeros(job.n_nodes, dtype=torch.bool)
    inside[roots] = True
    # Level by level from the top, so that each level reads its parents' final flags.
    for level in job.levels:
        parents = job.parents[level]
        inside[level] |= (parents >= 0) & inside[parents.clamp_min(0)]
    nodes = inside.nonzero().flatten()
    return nodes[torch.argsort(job.depths[nodes], stable=True)]


def _level_split(state: _JobState, depth: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Return what ``trie_mode="auto"`` reads at level ``depth`` of a job still run level by
    level, or None when the job is done or already whole.

    Returns ``(steps, margins, below)``. ``steps`` are the log-probabilities (nats, <= 0) of
    the candidate tokens scored at this level. ``margins[n]`` is how many nats the score of
    node ``n``'s level-``depth`` ancestor is above the bound (-inf off the survivors'
    subtrees). ``below`` are the nodes that whole tries would run below the survivors.
    """
    job = state.job
    if state.whole_from is not None or depth >= len(job.levels):
        return None
    scored, surviving = _survivors(state, depth)
    candidates = scored[job.true_depth[scored] == 0]
    parents = job.parents[candidates]
    parent_scores = torch.where(
        parents >= 0, state.cum[parents.clamp_min(0)], torch.zeros_like(state.cum[candidates])
    )
    steps = state.cum[candidates] - parent_scores

    margins = torch.full((job.n_nodes,), -math.inf)
    margins[surviving] = state.cum[surviving] - state.bound
    for level in job.levels[depth:]:
        margins[level] = torch.maximum(margins[level], margins[job.parents[level]])
    return steps, margins, _runnable_below(job, surviving)


WHOLE_SURVIVOR_SHARE = 0.9
"""Share of a level's scored candidate nodes that survive the bound, at or above which
``trie_mode="auto"`` runs the rest of the tries whole.

The prediction of :meth:`_TrieScorer._whole_from_here` extrapolates the nats lost per token at
the level just scored, and for a set after which the model finds every candidate unlikely it
predicts pruning that does not come. On the demo's SmolLM2 with the integrated-gradients 1%
set ablated (4 items per type, 32 jobs), 600 of 653 first-level nodes survived (92%), yet
levels went on to depth 5, where the rows crowded. With the learned set, 108 of 653 survived
(17%), and at most 72% at the deeper levels until depth 7 (31 of 35), where the prediction
had switched already. In one run each (2 CPU threads), the evaluation of the
integrated-gradients set took 90.8 s with this rule against 114.0 s without it, and the
evaluations of the learned, activation, slimming and clean sets made the same choices.
"""


def _survivor_share(states: list[_JobState], depth: int) -> float:
    """Return the share of the candidate nodes scored at level ``depth`` (off the true PII's
    path) that are at or above their job's bound, over the jobs still run level by level."""
    scored, surviving = 0, 0
    for state in states:
        if state.whole_from is not None or depth >= len(state.job.levels):
            continue
        nodes, above = _survivors(state, depth)
        scored += int((state.job.true_depth[nodes] == 0).sum())
        surviving += int((state.job.true_depth[above] == 0).sum())
    return surviving / scored if scored else 0.0


def _survivors(state: _JobState, depth: int) -> tuple[Tensor, Tensor]:
    """Return the nodes of level ``depth`` that have a score, and those of them at or above
    the bound."""
    nodes = state.job.levels[depth - 1]
    scored = nodes[state.cum[nodes] > -math.inf]
    return scored, scored[state.cum[scored] >= state.bound]


def _runnable_below(job: _TrieJob, roots: Tensor) -> Tensor:
    """Return ``roots`` and their descendants that need a forward pass (they have
    children and are off the true PII's path), in depth order."""
    below = _subtree(job, roots)
    return below[job.has_children[below] & (job.true_depth[below] == 0)]


def _paths_to(job: _TrieJob, nodes: Tensor) -> list[Tensor]:
    """Return the token path from the first PII token down to each node."""
    paths = []
    for node in nodes.tolist():
        tokens = []
        while node != -1:
            tokens.append(int(job.tokens[node]))
            node = int(job.parents[node])
        paths.append(torch.tensor(tokens[::-1], dtype=torch.long))
    return paths


class _CachedRunner:
    """Runs trie nodes behind their cached records, one padded forward pass per chunk.

    Each batch row holds jobs of one record, and its cache starts as a copy of that record's
    keys and values. Each pass appends one column per query to every row. A 4-D mask lets a
    node see its item's prefix, its ancestors and itself, and nothing else. A node's
    ancestors must have run in an earlier pass or earlier in the same pass.
    """

    def __init__(
        self, model: Any, cache: Any, config: ExposureConfig, rows: list[list[_JobState]]
    ) -> None:
        self.model = model
        self.config = config
        self.rows = rows
        # Position of each job state in the flattened order of the requests.
        self.positions: list[list[int]] = []
        flat = 0
        for row in rows:
            self.positions.append(list(range(flat, flat + len(row))))
            flat += len(row)
        self.states = [state for row in rows for state in row]
        self.cache = _runner_cache(cache, rows)
        self.cache_len = int(self.cache.get_seq_length())
        # Columns below this are the records' own keys and values, and the ones after are
        # trie nodes'.
        self.record_len = self.cache_len
        # Cache length right after the last compaction. Every pass appends columns, so an
        # equal length means no pass ran since, and compacting again would drop nothing new.
        self.compacted_len: int | None = None
        self.pad_id = _model_pad_id(model)

    def run(self, requests: list[Tensor]) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Run the requested nodes of every job and yield, per job and chunk,
        ``(job position, nodes, their logits)``."""
        queues = []
        for positions in self.positions:
            nodes = [requests[p] for p in positions]
            owners = [
                torch.full((len(n),), p, dtype=torch.long)
                for p, n in zip(positions, nodes, strict=True)
            ]
            queues.append((torch.cat(nodes), torch.cat(owners)))
        longest = max(len(nodes) for nodes, _ in queues)
        per_row = max(1, self.config.max_query_tokens // len(self.rows))
        for start in range(0, longest, per_row):
            chunks = [
                (nodes[start : start + per_row], owners[start : start + per_row])
                for nodes, owners in queues
            ]
            self._compact()
            logits = self._forward(chunks)
            for row, (nodes, owners) in enumerate(chunks):
                for position in owners.unique().tolist():
                    selected = (owners == position).nonzero().flatten()
                    yield position, nodes[selected], logits[row, selected.to(logits.device)]

    def _compact(self) -> None:
        """Drop the cache columns of trie nodes that no node still to run descends from.

        Every pass appends a column per query to every row, and each query attends over all
        columns, masked or not. After a few levels most columns belong to pruned or
        finished branches. Dropping them keeps the attention and the cache's own copies
        about as large as the prefix plus one branch. Caches other than transformers'
        plain ``DynamicLayer`` ones (sliding windows, older versions) are left whole.
        """
        if self.cache_len - self.record_len < _MIN_COLUMNS_TO_COMPACT:
            return
        if self.cache_len == self.compacted_len:
            return
        layers = _plain_cache_layers(self.cache)
        if layers is None:
            return
        keep = torch.zeros(self.cache_len, dtype=torch.bool)
        keep[: self.record_len] = True
        for state in self.states:
            needed = _has_pending_descendant(state) & (state.cols >= self.record_len)
            keep[state.cols[needed]] = True
        kept_columns = keep.nonzero().flatten()
        self.compacted_len = len(kept_columns)
        if len(kept_columns) == self.cache_len:
            return

        new_column = torch.full((self.cache_len,), _DROPPED, dtype=torch.long)
        new_column[kept_columns] = torch.arange(len(kept_columns))
        index = kept_columns.to(layers[0].keys.device)
        for layer in layers:
            layer.keys = layer.keys.index_select(2, index)
            layer.values = layer.values.index_select(2, index)
        for state in self.states:
            appended = state.cols >= self.record_len
            state.cols[appended] = new_column[state.cols[appended]]
        self.cache_len = len(kept_columns)

    def _forward(self, chunks: list[tuple[Tensor, Tensor]]) -> Tensor:
        n_rows = len(chunks)
        width = max(1, max(len(nodes) for nodes, _ in chunks))
        kv_len = self.cache_len + width
        input_ids = torch.full((n_rows, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((n_rows, width), dtype=torch.long)
        visible = torch.zeros((n_rows, width, kv_len), dtype=torch.bool)
        # Padding queries attend to BOS only, so that no softmax row is empty.
        visible[:, :, 0] = True

        for row, (nodes, owners) in enumerate(chunks):
            for position in owners.unique().tolist():
                queries = (owners == position).nonzero().flatten()
                self._place(
                    self.states[position],
                    nodes[queries],
                    row,
                    queries,
                    input_ids,
                    positions,
                    visible,
                )

        logits, self.cache = _tree_forward(self.model, self.cache, input_ids, positions, visible)
        self.cache_len = kv_len
        return logits

    def _place(
        self,
        state: _JobState,
        nodes: Tensor,
        row: int,
        queries: Tensor,
        input_ids: Tensor,
        positions: Tensor,
        visible: Tensor,
    ) -> None:
        """Put one job's nodes (in depth order) at ``queries`` of ``row`` and open their
        attention to the prefix, their ancestors and themselves."""
        job = state.job
        input_ids[row, queries] = job.tokens[nodes]
        positions[row, queries] = state.prefix_len + job.depths[nodes] - 1
        visible[row, queries, state.offset : state.offset + state.prefix_len] = True
        # Columns first, so that ancestors in this same pass are visible below.
        own_cols = self.cache_len + queries
        state.cols[nodes] = own_cols
        visible[row, queries, own_cols] = True
        ancestors = job.parents[nodes]
        while True:
            has = ancestors >= 0
            if not has.any():
                break
            cols = state.cols[ancestors[has]]
            if (cols < 0).any():
                raise RuntimeError(
                    "internal error in exposure scoring: a trie node was queued before one of "
                    "its ancestors; please report it with the model and ExposureConfig"
                )
            visible[row, queries[has], cols] = True
            ancestors = torch.where(has, job.parents[ancestors.clamp_min(0)], ancestors)


def _runner_cache(cache: Any, rows: list[list[_JobState]]) -> Any:
    """Return a copy of the records' cache with one batch row per runner row, holding the
    keys and values of that row's records side by side. Set each job's ``offset`` (where
    its record starts) and its cache columns: the record's own for the true PII's nodes,
    none for the others.

    A row with fewer records than the widest row repeats its first record there, in
    columns that no query attends to.
    """
    records = [list(dict.fromkeys(state.row for state in row)) for row in rows]
    width = max(len(row_records) for row_records in records)
    grown = copy.deepcopy(cache)
    if width == 1:
        grown.batch_select_indices(torch.tensor([row_records[0] for row_records in records]))
        record_len = int(grown.get_seq_length())
    else:
        layers = _plain_cache_layers(grown)
        if layers is None:
            raise ValueError(
                f"rows of several records need plain cache layers, not {type(cache).__name__}"
            )
        record_len = int(layers[0].keys.shape[2])
        padded = [
            row_records + row_records[:1] * (width - len(row_records)) for row_records in records
        ]
        index = torch.tensor(padded).to(layers[0].keys.device)
        for layer in layers:
            # [batch, heads, record_len, head_dim] -> [rows, heads, width * record_len, head_dim]
            for name in ("keys", "values"):
                picked = getattr(layer, name)[index].transpose(1, 2)
                setattr(layer, name, picked.flatten(2, 3))

    for row, row_records in zip(rows, records, strict=True):
        for state in row:
            state.offset = row_records.index(state.row) * record_len
            on_true = state.job.true_depth > 0
            state.cols.fill_(-1)
            state.cols[on_true] = (
                state.offset + state.prefix_len + state.job.true_depth[on_true] - 1
            )
    return grown


_MIN_COLUMNS_TO_COMPACT = 64
"""Trie columns a runner's cache must contain before :meth:`_CachedRunner._compact` runs."""

_DROPPED = -2
"""``_JobState.cols`` of a node whose cache column was dropped (-1: never run)."""


def _has_pending_descendant(state: _JobState) -> Tensor:
    """Return, per node, whether a node below it may still run as a query.

    Such a node has children and has not run yet. Neither it nor an ancestor is scored
    below the bound, since those branches are pruned, but unscored nodes may still run.
    Its query attends to every ancestor's column.
    """
    job = state.job
    pruned = (state.cum > -math.inf) & (state.cum < state.bound)
    for level in job.levels[1:]:
        pruned[level] |= pruned[job.parents[level]]
    pending = job.has_children & (state.cols == -1) & ~pruned
    if state.whole_from is not None:
        # A whole trie runs the survivors of level ``whole_from`` and the nodes below them,
        # so a node above that level without a column will not run.
        pending &= job.depths >= state.whole_from
    under = torch.zeros(job.n_nodes, dtype=torch.bool)
    for level in reversed(job.levels[1:]):
        flagged = level[pending[level] | under[level]]
        under[job.parents[flagged]] = True
    return under


def _plain_cache_layers(cache: Any) -> list[Any] | None:
    """Return the layers of a transformers ``DynamicCache`` made of plain ``DynamicLayer``
    layers only, whose columns can be selected freely, or None for any other cache."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer) is DynamicLayer for layer in layers):
        return None
    if any(layer.keys is None or layer.keys.dim() != 4 for layer in layers):
        return None
    return list(layers)


# ---- greedy decoding behind the record's forward pass ----


class _GreedyDecoder:
    """Greedy decoding of every PII item of a record batch, starting from the records' pass.

    While the greedy tokens equal the PII tokens, their next-token logits are the record's
    own (teacher-forced) logits, so an item needs forward passes only after its first wrong
    token. With a KV cache that takes tree queries (``cache`` not None), each pass then runs
    one query per unfinished item. The query is the item's last greedy token at the position
    it would have after the prefix. It attends to the record's columns up to the wrong token
    and to the item's earlier queries (the tree mask of :class:`_CachedRunner`). Decoding
    ``n`` items costs at most ``max PII length - 1`` small passes instead of ``n`` prefix
    passes plus their steps.
    Without such a cache, the unfinished items continue with
    :func:`tl_privacy.extraction.greedy_decode` from the prefix, the agreed PII tokens and
    the first wrong one. Either way the tokens are those ``greedy_decode`` gives from each
    prefix alone (up to floating-point ties).
    """

    def __init__(
        self,
        model: Any,
        cache: Any,
        logits: Float[Tensor, "batch pos d_vocab"],
        rows: dict[int, int],
        items: Sequence[PIIItem],
        eos_token_id: int | None,
        batch_size: int = 32,
    ) -> None:
        self.model = model
        self.batch_size = batch_size
        self.cache = cache
        self.logits = logits
        self.rows = rows
        self.items = items
        self.eos_token_id = eos_token_id
        self.pad_id = _model_pad_id(model)

    def decode(self, item_indices: Sequence[int]) -> dict[int, Tensor]:
        """Return the greedy tokens of each item, at most its PII length, cut before EOS."""
        generated: dict[int, list[int]] = {}
        seen: dict[int, int] = {}  # number of record columns visible to each diverged item
        for index in item_indices:
            tokens, agreed = self._free_tokens(index)
            generated[index] = tokens
            if self._unfinished(index, tokens):
                seen[index] = len(self.items[index].prefix_ids) + agreed

        if self.cache is None:
            self._continue_uncached(generated, list(seen))
            return {index: self._cut(generated[index]) for index in item_indices}

        cache = copy.deepcopy(self.cache)
        cache_len = int(cache.get_seq_length())
        own_columns: dict[int, list[int]] = {index: [] for index in seen}
        active = list(seen)
        while active:
            by_row: dict[int, list[int]] = {}
            for index in active:
                by_row.setdefault(self.rows[self.items[index].record_index], []).append(index)
            width = max(len(indices) for indices in by_row.values())
            n_rows = int(self.logits.shape[0])
            kv_len = cache_len + width
            input_ids = torch.full((n_rows, width), self.pad_id, dtype=torch.long)
            positions = torch.zeros((n_rows, width), dtype=torch.long)
            visible = torch.zeros((n_rows, width, kv_len), dtype=torch.bool)
            visible[:, :, 0] = True  # padding queries see BOS, so no softmax row is empty

            for row, indices in by_row.items():
                for query, index in enumerate(indices):
                    tokens = generated[index]
                    input_ids[row, query] = tokens[-1]
                    positions[row, query] = len(self.items[index].prefix_ids) + len(tokens) - 1
                    visible[row, query, : seen[index]] = True
                    visible[row, query, own_columns[index]] = True
                    visible[row, query, cache_len + query] = True
                    own_columns[index].append(cache_len + query)

            logits, cache = _tree_forward(self.model, cache, input_ids, positions, visible)
            cache_len = kv_len
            for row, indices in by_row.items():
                for query, index in enumerate(indices):
                    generated[index].append(int(logits[row, query].argmax()))
            active = [index for index in active if self._unfinished(index, generated[index])]

        return {index: self._cut(generated[index]) for index in item_indices}

    def _continue_uncached(self, generated: dict[int, list[int]], unfinished: list[int]) -> None:
        if not unfinished:
            return
        prefixes, limits = [], []
        for index in unfinished:
            item = self.items[index]
            tokens = torch.tensor(generated[index], dtype=torch.long)
            prefixes.append(torch.cat([item.prefix_ids, tokens]))
            limits.append(len(item.target_ids) - len(generated[index]))
        # The hooks of record_metrics are attached already, so none are passed again.
        # Left-padded batches under bfloat16 autocast gave NaN logits on SmolLM2 (the padding
        # mask's float32 minimum overflows), so these prefixes run without autocast.
        device_type = _model_device(self.model).type
        with torch.autocast(device_type, enabled=False):
            continued = greedy_decode(
                self.model,
                prefixes,
                limits,
                batch_size=self.batch_size,
                eos_token_id=self.eos_token_id,
            )
        for index, tokens in zip(unfinished, continued, strict=True):
            generated[index].extend(tokens.tolist())

    def _free_tokens(self, index: int) -> tuple[list[int], int]:
        """Greedy tokens read off the record's logits: the PII tokens the argmax agrees with,
        then the first argmax that differs. Returns them and the number that agree."""
        item = self.items[index]
        row = self.rows[item.record_index]
        prefix_len, target = len(item.prefix_ids), item.target_ids.tolist()
        predicted = self.logits[row, prefix_len - 1 : prefix_len - 1 + len(target)].argmax(-1)
        tokens: list[int] = []
        for token, expected in zip(predicted.tolist(), target, strict=True):
            tokens.append(token)
            if token != expected:
                return tokens, len(tokens) - 1
        return tokens, len(tokens)

    def _unfinished(self, index: int, tokens: list[int]) -> bool:
        if len(tokens) >= len(self.items[index].target_ids):
            return False
        return self.eos_token_id is None or self.eos_token_id not in tokens

    def _cut(self, tokens: list[int]) -> Tensor:
        if self.eos_token_id is not None and self.eos_token_id in tokens:
            tokens = tokens[: tokens.index(self.eos_token_id)]
        return torch.tensor(tokens, dtype=torch.long)


def _tree_forward(
    model: Any,
    cache: Any,
    input_ids: Int[Tensor, "batch query"],
    positions: Int[Tensor, "batch query"],
    visible: Bool[Tensor, "batch query kv"],
) -> tuple[Float[Tensor, "batch query d_vocab"], Any]:
    """Run queries behind ``cache`` with a 4-D mask: query ``q`` of row ``b`` attends to the
    key columns where ``visible[b, q]`` is True. Returns the logits in the dtype the model
    gives them (bfloat16 under bfloat16 autocast) and the grown cache."""
    dtype = _model_dtype(model)
    device = _model_device(model)
    mask = torch.zeros(visible.shape, dtype=dtype)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    with _quiet_cache_deprecation():
        logits, cache = model(
            input_ids.to(device),
            attention_mask=mask[:, None].to(device),
            position_ids=positions.to(device),
            past_key_values=cache,
            return_type="logits_and_cache",
        )
    return logits, cache


# ---- KV cache support ----

# Result of tree_cache_mode() per model and attention path (fused or not); weak so models
# can be freed.
_TREE_CACHE_MODE: weakref.WeakKeyDictionary[Any, dict[bool, str | None]] = (
    weakref.WeakKeyDictionary()
)


def tree_cache_mode(model: Any) -> str | None:
    """Return how to score tries behind a KV cache on ``model``, or None if it cannot.

    ``"direct"``: ``past_key_values`` works as documented. ``"renamed"``: it works once the
    cache is handed to the attention components under the name they read (see
    :func:`_cache_kwarg_renamed`). The check runs once per model: it scores three tree nodes
    (two siblings and a child) behind a 5-token cache with a 4-D mask and compares their
    logits with plain forward passes, once for each attention path
    (:func:`tl_privacy.attention.fused_attention` on or off).
    """
    modes = _TREE_CACHE_MODE.setdefault(model, {})
    fused = is_fused(model)
    if fused in modes:
        return modes[fused]
    mode = None
    for candidate in ("direct", "renamed"):
        renamed = _cache_kwarg_renamed(model) if candidate == "renamed" else nullcontext()
        try:
            with renamed:
                matches = _tree_logits_match(model)
        except (TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError) as error:
            logger.info("tree attention with a KV cache failed (%s mode): %s", candidate, error)
            matches = False
        if matches:
            mode = candidate
            break
    if mode is None:
        logger.info("%s: scoring exposure candidates without a KV cache", type(model).__name__)
    modes[fused] = mode
    return mode


def _tree_logits_match(model: Any) -> bool:
    device = _model_device(model)
    vocab = int(model.cfg.d_vocab)
    tokens = (torch.arange(1, 8, device=device) % vocab)[None]
    sibling = (tokens[0, 5] + 1) % vocab
    ones = torch.ones_like(tokens)
    with torch.no_grad():
        reference = model(tokens, attention_mask=ones, return_type="logits")[0]
        other = torch.cat([tokens[:, :5], sibling.view(1, 1)], dim=1)
        reference_sibling = model(other, attention_mask=ones[:, :6], return_type="logits")[0, 5]
        output = _forward_with_cache(model, tokens[:, :5], ones[:, :5])
        if output[1] is None:
            return False

        # Queries: the true token 5, a sibling at the same position, and token 6 below token 5.
        input_ids = torch.stack([tokens[0, 5], sibling, tokens[0, 6]])[None]
        positions = torch.tensor([[5, 5, 6]], device=device)
        visible = torch.zeros((3, 8), dtype=torch.bool)
        visible[:, :5] = True
        visible[0, 5] = visible[1, 6] = True
        visible[2, 5] = visible[2, 7] = True
        dtype = _model_dtype(model)
        mask = torch.zeros((1, 1, 3, 8), dtype=dtype)
        mask[0, 0].masked_fill_(~visible, torch.finfo(dtype).min)
        with _quiet_cache_deprecation():
            logits, _ = model(
                input_ids,
                attention_mask=mask.to(device),
                position_ids=positions,
                past_key_values=output[1],
                return_type="logits_and_cache",
            )
    expected = torch.stack([reference[5], reference_sibling, reference[6]])
    tolerance = 1e-3 * float(expected.abs().max()) + 1e-4
    return bool((logits[0].float() - expected.float()).abs().max() <= tolerance)


def _forward_with_cache(
    model: Any, input_ids: Tensor, attention_mask: Tensor
) -> tuple[Tensor, Any]:
    return model(
        input_ids,
        attention_mask=attention_mask,
        use_cache=True,
        return_type="logits_and_cache",
    )


@contextmanager
def _quiet_cache_deprecation() -> Iterator[None]:
    """Silence transformers 5's warning that ``past_key_values`` is now called ``cache``.

    ``TransformerBridge.forward`` (transformer-lens 4.3.0) takes only ``past_key_values`` and
    passes it on under that name, so the warning would fire on every trie level.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        yield


# ---- small helpers ----


def _pad(sequences: Sequence[Tensor], pad_id: int, padding_side: str) -> tuple[Tensor, Tensor]:
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        columns = (
            slice(0, len(sequence))
            if padding_side == "right"
            else slice(width - len(sequence), width)
        )
        input_ids[row, columns] = sequence
        attention_mask[row, columns] = 1
    return input_ids, attention_mask


def _model_device(model: Any) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _model_dtype(model: Any) -> torch.dtype:
    parameter = next(iter(model.parameters()), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    return dtype if dtype.is_floating_point else torch.float32


def _model_pad_id(model: Any) -> int:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return 0
    try:
        return pad_token_id(tokenizer)
    except ValueError:
        return 0


__all__ = [
    "CANDIDATE_TYPES",
    "DEFAULT_N_CANDIDATES",
    "ExposureConfig",
    "ExposureResult",
    "ItemExposure",
    "ItemScore",
    "RecordMetrics",
    "TokenMetrics",
    "exposure_from_rank",
    "exposure_from_scores",
    "exposure_scores",
    "general_perplexity",
    "mean_reciprocal_rank",
    "perplexity",
    "record_metrics",
    "sequence_nll",
    "text_windows",
    "token_nll",
    "tree_cache_mode",
]
