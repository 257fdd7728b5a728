"""One evaluation of a model under a set of forward hooks: leakage and utility together.

:func:`evaluate` measures, with the same hooks throughout:

- greedy extraction of the training PII (exact rate and character similarity), and of the
  held-out PII, decoded from each record's own forward pass onwards
  (``record_metrics(..., greedy=True)``), which gives the tokens that decoding each prefix
  alone gives;
- exposure and MRR of the training PII among candidates of the same format;
- teacher-forced PII token accuracy and cross-entropy on the training records;
- perplexity on the non-PII tokens of the training and held-out records and on general text.

:func:`compare` puts two results side by side (clean against ablated, for example).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch

from tl_privacy.attention import fused_attention
from tl_privacy.data.records import PIIRecord, type_tuple
from tl_privacy.extraction import score_decoded
from tl_privacy.metrics import (
    DEFAULT_N_CANDIDATES,
    DEFAULT_WINDOW,
    ExposureConfig,
    ExposureResult,
    RecordMetrics,
    general_perplexity,
    record_metrics,
)
from tl_privacy.precision import weights_cast_once

logger = logging.getLogger("tl_privacy")

SUMMARY_METRICS = (
    "extraction_exact",
    "extraction_similarity",
    "exposure_mean",
    "mrr",
    "pii_token_accuracy",
    "pii_cross_entropy",
    "perplexity_train",
    "perplexity_heldout",
    "perplexity_general",
    "heldout_extraction_exact",
    "heldout_exposure_mean",
)
"""The scalar metrics of an :class:`EvaluationResult`, in report order."""

RESULT_KEYS = (*SUMMARY_METRICS, "by_type", "items", "seconds")
"""The top-level keys of :meth:`EvaluationResult.to_dict`."""


@dataclass(frozen=True)
class EvaluationConfig:
    """Settings of :func:`evaluate`.

    Attributes:
        n_candidates: candidates per PII item for exposure and MRR; 0 skips both (they are
            then None). Exposure's maximum is ``log2(n_candidates + 1)`` bits.
        batch_size: records (or general-text windows) per forward pass.
        extraction_batch_size: PII items decoded side by side where greedy extraction
            re-runs prefixes (models without a tree-capable KV cache, such as TL-native ones).
        seed: seed of the candidate draws.
        general_text_tokens: tokens of the general text to use, or None for all of it
            (about 5,500 SmolLM2 tokens).
        window: tokens per general-text window, BOS included, capped at the model's n_ctx.
        types: PII types to measure, or None for all.
        extraction: ``"greedy"`` decodes each item with
            :func:`tl_privacy.extraction.extraction_scores` (exact match and similarity of
            the decoded string). ``"teacher_forced"`` reads exact match from the records'
            forward pass, which costs no extra pass, and leaves similarity None. Both agree
            on exact match up to ties between logits, and up to a different tokenization of
            the same string, which only the greedy string comparison counts as exact.
        exposure: further exposure settings; its ``n_candidates`` and ``seed`` are
            replaced by the fields above.
        heldout_exposure: also rank the held-out PII among its candidates. A model that
            never saw a PII string still ranks it above random candidates where the context
            gives it away (an e-mail address built from the sender's name, which the record
            states), so this is the exposure that ablation cannot remove without damaging
            in-context copying. It costs about as much as the training items' exposure, and
            more than it on the clean model, because nothing prunes the candidates of PII
            the model finds unlikely.
        precision: ``"bfloat16"`` runs every forward pass under bfloat16 autocast, about
            1.7 times faster on a CPU with native bfloat16; ``"float32"`` does not;
            ``"auto"`` picks bfloat16 where it runs natively
            (:func:`tl_privacy.precision.resolve_precision`). bfloat16 rounding can turn
            near-ties between logits (greedy tokens, candidate ranks) either way, so compare
            only results of one precision. On the memorized SmolLM2 of the demo the two gave
            the same extraction rate and exposure, and general-text perplexities 0.4% apart.
        fused_attention: run attention with PyTorch's fused kernel where no hook reads it
            (see :func:`tl_privacy.attention.fused_attention`). It rounds differently from the
            bridge's own attention under bfloat16: on the demo's learned set, MRR 0.931 against
            0.934 and general-text perplexity 125.92 against 125.80, at the same extraction.
    """

    n_candidates: int = DEFAULT_N_CANDIDATES
    batch_size: int = 8
    extraction_batch_size: int = 32
    seed: int = 0
    general_text_tokens: int | None = None
    window: int = DEFAULT_WINDOW
    types: tuple[str, ...] | None = None
    extraction: Literal["greedy", "teacher_forced"] = "greedy"
    exposure: ExposureConfig = field(default_factory=ExposureConfig)
    precision: Literal["auto", "bfloat16", "float32"] = "float32"
    heldout_exposure: bool = False
    fused_attention: bool = True

    def __post_init__(self) -> None:
        for name in ("heldout_exposure", "fused_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        for name in ("n_candidates", "batch_size", "extraction_batch_size", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}.")
        if self.n_candidates < 0:
            raise ValueError(
                f"n_candidates must be >= 0 (0 skips exposure), got {self.n_candidates}."
            )
        for name in ("batch_size", "extraction_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.window < 2:
            raise ValueError(f"window must be at least 2 tokens, got {self.window}.")
        if self.general_text_tokens is not None and self.general_text_tokens < 2:
            raise ValueError(
                f"general_text_tokens must be at least 2 or None, got {self.general_text_tokens}."
            )
        if self.precision not in ("auto", "bfloat16", "float32"):
            raise ValueError(
                f"precision must be 'auto', 'bfloat16' or 'float32', got {self.precision!r}."
            )
        if self.extraction not in ("greedy", "teacher_forced"):
            raise ValueError(
                f"extraction must be 'greedy' or 'teacher_forced', got {self.extraction!r}."
            )
        if self.types is not None:
            object.__setattr__(self, "types", type_tuple(self.types, "types"))

    def exposure_config(self) -> ExposureConfig | None:
        """Return the exposure settings with this config's candidate count and seed, or None."""
        if self.n_candidates == 0:
            return None
        settings = {f.name: getattr(self.exposure, f.name) for f in fields(ExposureConfig)}
        settings.update(n_candidates=self.n_candidates, seed=self.seed)
        return ExposureConfig(**settings)


@dataclass
class EvaluationResult:
    """Leakage and utility metrics of one model under one set of hooks.

    Rates are fractions in [0, 1], cross-entropies are in nats, exposure is in bits, and a
    metric that was not measured (no held-out records, exposure skipped) is None.

    Attributes:
        extraction_exact: share of training PII items that greedy decoding reproduces.
        extraction_similarity: mean character similarity of the greedy output to the PII
            (None with teacher-forced extraction).
        exposure_mean: mean exposure of the training PII items, in bits.
        mrr: mean reciprocal rank of the true PII among its candidates.
        pii_token_accuracy: teacher-forced argmax accuracy on the training PII tokens.
        pii_cross_entropy: mean NLL of the training PII tokens.
        perplexity_train: perplexity of the training records' non-PII tokens.
        perplexity_heldout: perplexity of the held-out records' non-PII tokens.
        perplexity_general: perplexity of the general English text.
        heldout_extraction_exact: share of held-out PII items that greedy decoding reproduces,
            decided by teacher forcing (equal up to ties between logits).
        heldout_exposure_mean: mean exposure of the held-out PII items, in bits, when
            ``EvaluationConfig.heldout_exposure`` is set: the exposure of PII the model never
            saw, the level below which ablation cannot push training exposure by forgetting.
        by_type: per PII type, the leakage metrics above, ``heldout_exposure_mean`` of the
            held-out items of the type, ``n_items`` and ``n_candidates`` (mean candidates per
            ranked item).
        items: one row per training PII item: ``record_index``, ``span_index``, ``type``,
            ``exact``, ``similarity``, ``rank``, ``exposure``, ``n_candidates``,
            ``log_likelihood`` (nats). The PII text is in the field ``pii`` and the greedy
            output, which may contain the PII, in ``decoded``, so a report can drop both.
        seconds: wall time of the evaluation.
    """

    extraction_exact: float
    extraction_similarity: float | None
    exposure_mean: float | None
    mrr: float | None
    pii_token_accuracy: float
    pii_cross_entropy: float
    perplexity_train: float
    perplexity_heldout: float | None
    perplexity_general: float
    heldout_extraction_exact: float | None
    heldout_exposure_mean: float | None
    by_type: dict[str, dict[str, Any]]
    items: list[dict[str, Any]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON-ready values, with exactly the keys of ``RESULT_KEYS``.

        NaN becomes None, because JSON has no NaN.
        """
        return {key: _json_ready(getattr(self, key)) for key in RESULT_KEYS}


def evaluate(
    model: Any,
    tokenizer: Any,
    train_records: Sequence[PIIRecord],
    heldout_records: Sequence[PIIRecord] | None = None,
    *,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
    config: EvaluationConfig | None = None,
) -> EvaluationResult:
    """Measure leakage of the training PII and utility of ``model`` under ``fwd_hooks``.

    Args:
        model: a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``); it
            needs no tokenizer of its own.
        tokenizer: the tokenizer the records are tokenized with, which also decodes the
            greedy continuations.
        train_records: records the model was trained on.
        heldout_records: records it never saw, or None / empty to skip held-out metrics.
        fwd_hooks: ``(hook name, hook function)`` pairs applied to every forward pass, for
            example ``neurons.ablation_hooks()``; none stays attached afterwards.
        config: settings; defaults to :class:`EvaluationConfig()`.
    """
    config = config or EvaluationConfig()
    if not train_records:
        raise ValueError("evaluate needs at least one training record, got none.")
    for name, records in (("train_records", train_records), ("heldout_records", heldout_records)):
        wrong = next((r for r in records or () if not isinstance(r, PIIRecord)), None)
        if wrong is not None:
            raise TypeError(
                f"{name} must hold PIIRecord objects, got a {type(wrong).__name__}; convert "
                "files or dicts with tl_privacy.data.load_records."
            )
    # Read once: a generator of hooks would be used up by the names below.
    fwd_hooks = list(fwd_hooks)
    hook_names = [name for name, _ in fwd_hooks]
    attention = fused_attention(model, hook_names) if config.fused_attention else nullcontext()
    with torch.no_grad(), weights_cast_once(model, config.precision), attention:
        return _evaluate(model, tokenizer, train_records, heldout_records, fwd_hooks, config)


def _evaluate(
    model: Any,
    tokenizer: Any,
    train_records: Sequence[PIIRecord],
    heldout_records: Sequence[PIIRecord] | None,
    fwd_hooks: Sequence[tuple[str, Any]],
    config: EvaluationConfig,
) -> EvaluationResult:
    started = time.perf_counter()
    hooks = list(fwd_hooks)
    timings: dict[str, float] = {}

    greedy = config.extraction == "greedy"
    clock = time.perf_counter()
    train = record_metrics(
        model,
        tokenizer,
        train_records,
        fwd_hooks=hooks,
        batch_size=config.batch_size,
        types=config.types,
        exposure=config.exposure_config(),
        greedy=greedy,
        decode_batch_size=config.extraction_batch_size,
    )
    timings["records and exposure"] = time.perf_counter() - clock
    if not train.items:
        raise ValueError(
            "the training records have no PII items"
            + (f" of types {list(config.types)}" if config.types else "")
            + "; check their spans."
        )

    clock = time.perf_counter()
    extraction = _extraction(tokenizer, train, config)
    timings["extraction"] = time.perf_counter() - clock

    clock = time.perf_counter()
    heldout = _heldout_metrics(model, tokenizer, heldout_records, hooks, config)
    timings["held-out"] = time.perf_counter() - clock

    clock = time.perf_counter()
    perplexity_general = general_perplexity(
        model,
        tokenizer,
        fwd_hooks=hooks,
        max_tokens=config.general_text_tokens,
        window=config.window,
        batch_size=config.batch_size,
    )
    timings["general text"] = time.perf_counter() - clock

    seconds = time.perf_counter() - started
    logger.info(
        "evaluate: %.1f s (%s)",
        seconds,
        ", ".join(f"{name} {value:.1f} s" for name, value in timings.items()),
    )
    return _result(train, extraction, heldout, perplexity_general, seconds)


@dataclass(frozen=True)
class _Extraction:
    """Per-item extraction outcomes; ``similarity`` and ``decoded`` are None when teacher-forced."""

    exact: list[bool]
    similarity: list[float] | None
    decoded: list[str] | None

    def rates(self, indices: Sequence[int]) -> tuple[float, float | None]:
        """Exact rate and mean similarity over ``indices``."""
        exact = sum(self.exact[i] for i in indices) / len(indices)
        if self.similarity is None:
            return exact, None
        return exact, sum(self.similarity[i] for i in indices) / len(indices)


def _extraction(tokenizer: Any, metrics: RecordMetrics, config: EvaluationConfig) -> _Extraction:
    if config.extraction == "teacher_forced":
        return _Extraction([score.exact for score in metrics.item_scores], None, None)
    scored = [
        score_decoded(tokenizer, item, score.greedy_ids)
        for item, score in zip(metrics.items, metrics.item_scores, strict=True)
    ]
    return _Extraction(
        exact=[item.exact for item in scored],
        similarity=[item.similarity for item in scored],
        decoded=[item.decoded for item in scored],
    )


@dataclass(frozen=True)
class _Heldout:
    """Held-out metrics; every field is None without held-out records."""

    perplexity: float | None = None
    extraction_exact: float | None = None
    exposure_mean: float | None = None
    exposure_by_type: dict[str, float] = field(default_factory=dict)


def _heldout_metrics(
    model: Any,
    tokenizer: Any,
    records: Sequence[PIIRecord] | None,
    hooks: list,
    config: EvaluationConfig,
) -> _Heldout:
    if not records:
        return _Heldout()
    # Only the exact rate of held-out items is reported, and teacher forcing decides it from
    # the records' pass. Greedy decoding would add a pass per token for every item, because a
    # model that never saw the PII leaves it at once.
    metrics = record_metrics(
        model,
        tokenizer,
        records,
        fwd_hooks=hooks,
        batch_size=config.batch_size,
        types=config.types,
        exposure=config.exposure_config() if config.heldout_exposure else None,
    )
    if not metrics.items:
        return _Heldout(perplexity=metrics.tokens.perplexity)
    exact = [score.exact for score in metrics.item_scores]
    exposure = metrics.exposure
    return _Heldout(
        perplexity=metrics.tokens.perplexity,
        extraction_exact=sum(exact) / len(exact),
        exposure_mean=None if exposure is None else exposure.exposure_mean,
        exposure_by_type={}
        if exposure is None
        else {name: values["exposure_mean"] for name, values in exposure.by_type().items()},
    )


def _result(
    train: RecordMetrics,
    extraction: _Extraction,
    heldout: _Heldout,
    perplexity_general: float,
    seconds: float,
) -> EvaluationResult:
    exposure = train.exposure
    exact, similarity = extraction.rates(range(len(train.items)))
    return EvaluationResult(
        extraction_exact=exact,
        extraction_similarity=similarity,
        exposure_mean=None if exposure is None else exposure.exposure_mean,
        mrr=None if exposure is None else exposure.mrr,
        pii_token_accuracy=train.tokens.pii_token_accuracy,
        pii_cross_entropy=train.tokens.pii_cross_entropy,
        perplexity_train=train.tokens.perplexity,
        perplexity_heldout=heldout.perplexity,
        perplexity_general=perplexity_general,
        heldout_extraction_exact=heldout.extraction_exact,
        heldout_exposure_mean=heldout.exposure_mean,
        by_type=_by_type(train, extraction, exposure, heldout),
        items=_item_rows(train, extraction, exposure),
        seconds=seconds,
    )


def _by_type(
    train: RecordMetrics,
    extraction: _Extraction,
    exposure: ExposureResult | None,
    heldout: _Heldout,
) -> dict[str, dict[str, Any]]:
    exposure_types = exposure.by_type() if exposure is not None else {}
    indices_by_type: dict[str, list[int]] = {}
    for index, item in enumerate(train.items):
        indices_by_type.setdefault(item.type, []).append(index)

    result = {}
    for pii_type, indices in indices_by_type.items():
        exact, similarity = extraction.rates(indices)
        tokens = train.tokens.by_type.get(pii_type, {})
        ranked = exposure_types.get(pii_type, {})
        result[pii_type] = {
            "n_items": len(indices),
            "extraction_exact": exact,
            "extraction_similarity": similarity,
            "exposure_mean": ranked.get("exposure_mean"),
            "mrr": ranked.get("mrr"),
            "n_candidates": ranked.get("n_candidates"),
            "pii_token_accuracy": tokens.get("pii_token_accuracy"),
            "pii_cross_entropy": tokens.get("pii_cross_entropy"),
            "heldout_exposure_mean": heldout.exposure_by_type.get(pii_type),
        }
    return result


def _item_rows(
    train: RecordMetrics, extraction: _Extraction, exposure: ExposureResult | None
) -> list[dict[str, Any]]:
    rows = []
    for index, (item, score) in enumerate(zip(train.items, train.item_scores, strict=True)):
        ranked = exposure.items[index] if exposure is not None else None
        rows.append(
            {
                "record_index": item.record_index,
                "span_index": item.span_index,
                "type": item.type,
                "exact": extraction.exact[index],
                "similarity": None
                if extraction.similarity is None
                else extraction.similarity[index],
                "rank": None if ranked is None else ranked.rank,
                "exposure": None if ranked is None else ranked.exposure,
                "n_candidates": None if ranked is None else ranked.n_candidates,
                "log_likelihood": score.log_likelihood,
                "pii": item.text,
                "decoded": None if extraction.decoded is None else extraction.decoded[index],
            }
        )
    return rows


# ---- comparison ----


def compare(
    clean: EvaluationResult | Mapping[str, Any], edited: EvaluationResult | Mapping[str, Any]
) -> dict[str, Any]:
    """Changes from ``clean`` to ``edited`` for every scalar metric, overall and per type.

    Returns ``{metric: {"clean", "edited", "absolute", "relative"}}`` where ``absolute`` is
    ``edited - clean`` and ``relative`` is ``absolute / |clean|`` (None when ``clean`` is 0
    or either value is missing), plus ``"by_type": {type: {metric: ...}}`` for the types and
    metrics that both results have.
    """
    before = clean.to_dict() if isinstance(clean, EvaluationResult) else dict(clean)
    after = edited.to_dict() if isinstance(edited, EvaluationResult) else dict(edited)
    changes: dict[str, Any] = {
        metric: _change(before.get(metric), after.get(metric))
        for metric in SUMMARY_METRICS
        if metric in before or metric in after
    }

    by_type = {}
    before_types = before.get("by_type") or {}
    after_types = after.get("by_type") or {}
    for pii_type in before_types:
        if pii_type not in after_types:
            continue
        metrics = [
            key
            for key, value in before_types[pii_type].items()
            if key in after_types[pii_type] and key != "n_items" and _is_number(value)
        ]
        by_type[pii_type] = {
            metric: _change(before_types[pii_type][metric], after_types[pii_type][metric])
            for metric in metrics
        }
    changes["by_type"] = by_type
    return changes


def _change(before: Any, after: Any) -> dict[str, float | None]:
    if not (_is_number(before) and _is_number(after)):
        return {"clean": before, "edited": after, "absolute": None, "relative": None}
    absolute = float(after) - float(before)
    relative = absolute / abs(float(before)) if before != 0 else None
    return {"clean": before, "edited": after, "absolute": absolute, "relative": relative}


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_ready(item) for item in value]
    return value
