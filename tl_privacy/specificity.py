"""Are privacy neurons specific to a PII type, and do they generalize to unseen records?

- :func:`localize_by_type` finds one neuron set per PII type.
- :func:`jaccard_matrix` measures how much the sets overlap.
- :func:`cross_ablation` ablates each type's set and measures greedy extraction of every
  type: a specific set cuts its own type's leakage and leaves the others.
- :func:`seesaw` measures the leakage of PII that was left out of localization before and
  after ablation; leakage that rises is the "privacy seesaw".
- :func:`generalization` localizes on half of the records and measures on the other half.
- :func:`measure_specificity` runs the first three; its result's ``to_dict()`` is JSON-ready.

Leakage is exact greedy extraction (:func:`tl_privacy.extraction.extraction_scores`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tl_privacy.data.records import PIIRecord, type_tuple
from tl_privacy.data.tokenization import PIIItem, make_batches, pii_items
from tl_privacy.extraction import ExtractionResult, extraction_scores
from tl_privacy.localization import BatchSource, LocalizationConfig, ReferenceCache, localize
from tl_privacy.neurons import PrivacyNeurons


def localize_by_type(
    model: Any,
    batches: BatchSource,
    config: LocalizationConfig | None = None,
    types: Sequence[str] | None = None,
    references: ReferenceCache | None = None,
) -> dict[str, PrivacyNeurons]:
    """Localize one neuron set per PII type with ``localize(..., pii_types=(type,))``.

    Args:
        batches: the batches ``localize`` takes; they need ``pii_type_ids``.
        config: localization settings shared by every type; its ``pii_types`` is replaced.
        types: the types to localize; defaults to those with PII tokens in ``batches``, in
            the order of ``config.type_names``.
        references: the unmasked model's keep-position predictions on ``batches``. The
            types share them in any case. Pass the cache of an earlier run over the same
            batches (see :class:`tl_privacy.localization.ReferenceCache`) to share them
            with that run too.
    """
    config = config or LocalizationConfig()
    batch_list = [batches] if isinstance(batches, Mapping) else list(batches)
    if types is None:
        types = _types_present(batch_list, config.type_names)
    types = type_tuple(types, "types")
    if not types:
        raise ValueError("localize_by_type found no PII types to localize; pass types.")
    if references is None:
        references = ReferenceCache(config.reference_cache_mb)
    # A dict of whole tensors goes to localize as it is, so that every run splits it by
    # batch_size into the same batches, which the shared references are keyed by.
    source = batches if isinstance(batches, Mapping) else batch_list
    return {
        pii_type: localize(
            model,
            source,
            dataclasses.replace(config, pii_types=(pii_type,)),
            references=references,
        )
        for pii_type in types
    }


def _types_present(batches: list[Mapping[str, Any]], type_names: Sequence[str]) -> list[str]:
    present: set[int] = set()
    for index, batch in enumerate(batches):
        if "pii_type_ids" not in batch:
            raise ValueError(
                f"batch {index} has no pii_type_ids, which per-type localization needs; "
                "build the batches with tl_privacy.data.make_batches."
            )
        type_ids = torch.as_tensor(batch["pii_type_ids"])
        present.update(int(t) for t in type_ids[torch.as_tensor(batch["pii_mask"]).bool()].unique())
    return [name for position, name in enumerate(type_names) if position in present]


def jaccard_matrix(sets: Mapping[str, PrivacyNeurons]) -> dict[str, dict[str, float]]:
    """Jaccard overlap ``|A ∩ B| / |A ∪ B|`` of every pair of sets (1.0 on the diagonal)."""
    return {a: {b: sets[a].jaccard(sets[b]) for b in sets} for a in sets}


def cross_ablation(
    model: Any,
    tokenizer: Any,
    records: Sequence[PIIRecord],
    sets: Mapping[str, PrivacyNeurons],
    *,
    types: Sequence[str] | None = None,
    batch_size: int = 32,
    include_clean: bool = False,
) -> dict[str, dict[str, float]]:
    """Exact extraction of each measured type with each set ablated.

    Returns ``result[ablated][measured]``: the share of ``measured`` PII items of
    ``records`` that greedy decoding reproduces with the neurons of ``sets[ablated]`` zeroed.
    ``types`` are the measured types (default: the types of the records' items, in order of
    appearance). With ``include_clean`` the result also has a row ``"none"`` for the model
    without ablation.
    """
    items = _items(tokenizer, records, types)
    measured = list(dict.fromkeys(item.type for item in items))
    rows: dict[str, dict[str, float]] = {}
    if include_clean:
        rows["none"] = _exact_by_type(
            extraction_scores(model, items, batch_size=batch_size), measured
        )
    for name, neurons in sets.items():
        neurons.check_compatible(model)
        result = extraction_scores(
            model, items, fwd_hooks=neurons.ablation_hooks(), batch_size=batch_size
        )
        rows[name] = _exact_by_type(result, measured)
    return rows


def seesaw(
    model: Any,
    tokenizer: Any,
    localized_records: Sequence[PIIRecord],
    other_records: Sequence[PIIRecord],
    neurons: PrivacyNeurons,
    *,
    types: Sequence[str] | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Leakage of the localized PII and of the other PII, before and after ablation.

    Args:
        localized_records: the records ``neurons`` were localized on.
        other_records: training records left out of localization.
        neurons: the set to ablate (zeroed).
        types: PII types to measure (default all).

    Returns:
        ``{"localized": group, "other": group}``, where each group has ``n_items``,
        ``before`` and ``after`` (exact extraction rates), ``change`` (after - before),
        ``similarity_before``, ``similarity_after`` and ``by_type`` (type -> ``before``,
        ``after``, ``change``). A group without items has None rates.
    """
    neurons.check_compatible(model)
    hooks = neurons.ablation_hooks()
    return {
        "localized": _before_after(model, tokenizer, localized_records, hooks, types, batch_size),
        "other": _before_after(model, tokenizer, other_records, hooks, types, batch_size),
    }


def generalization(
    model: Any,
    tokenizer: Any,
    records: Sequence[PIIRecord],
    config: LocalizationConfig | None = None,
    *,
    fraction: float = 0.5,
    seed: int = 0,
    batch_size: int | None = None,
    extraction_batch_size: int = 32,
    types: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Localize on a random part of ``records`` and measure leakage on the rest.

    The records are shuffled with ``random.Random(seed)``; the first ``fraction`` of them
    are localized on. Neurons that generalize cut the leakage of the held-back records of
    the same types too.

    Returns:
        The :func:`seesaw` result plus ``n_neurons``, ``n_localized_records`` and
        ``n_other_records``.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be between 0 and 1 (exclusive), got {fraction}.")
    if len(records) < 2:
        raise ValueError(f"generalization needs at least 2 records to split, got {len(records)}.")
    config = config or LocalizationConfig()
    if types is not None and config.pii_types is None:
        config = dataclasses.replace(config, pii_types=tuple(types))

    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    cut = min(len(records) - 1, max(1, round(fraction * len(records))))
    localized = [records[i] for i in order[:cut]]
    held_back = [records[i] for i in order[cut:]]

    batches = make_batches(
        tokenizer,
        localized,
        batch_size or config.batch_size,
        type_names=config.type_names,
    )
    neurons = localize(model, batches, config)
    result = seesaw(
        model,
        tokenizer,
        localized,
        held_back,
        neurons,
        types=types,
        batch_size=extraction_batch_size,
    )
    result.update(
        n_neurons=neurons.count,
        n_localized_records=len(localized),
        n_other_records=len(held_back),
    )
    return result


@dataclass
class SpecificityResult:
    """Per-type neuron sets with their overlap and cross-ablation.

    Attributes:
        sets: PII type -> its neuron set.
        jaccard: see :func:`jaccard_matrix`.
        cross_ablation: see :func:`cross_ablation`; includes the ``"none"`` row.
    """

    sets: dict[str, PrivacyNeurons]
    jaccard: dict[str, dict[str, float]]
    cross_ablation: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: ``types``, ``counts``, ``by_layer``, ``jaccard``,
        ``cross_ablation``."""
        return {
            "types": list(self.sets),
            "counts": {name: neurons.count for name, neurons in self.sets.items()},
            "by_layer": {name: neurons.by_layer() for name, neurons in self.sets.items()},
            "jaccard": self.jaccard,
            "cross_ablation": self.cross_ablation,
        }


def measure_specificity(
    model: Any,
    tokenizer: Any,
    records: Sequence[PIIRecord],
    config: LocalizationConfig | None = None,
    *,
    types: Sequence[str] | None = None,
    batch_size: int | None = None,
    extraction_batch_size: int = 32,
) -> SpecificityResult:
    """Localize per type on ``records``, compare the sets and cross-ablate them."""
    config = config or LocalizationConfig()
    batches = make_batches(
        tokenizer, records, batch_size or config.batch_size, type_names=config.type_names
    )
    sets = localize_by_type(model, batches, config, types)
    cross = cross_ablation(
        model, tokenizer, records, sets, batch_size=extraction_batch_size, include_clean=True
    )
    return SpecificityResult(sets=sets, jaccard=jaccard_matrix(sets), cross_ablation=cross)


# ---- helpers ----


def _items(
    tokenizer: Any, records: Sequence[PIIRecord], types: Sequence[str] | None
) -> list[PIIItem]:
    items = pii_items(tokenizer, records, types=types)
    if not items:
        raise ValueError(
            "the records have no PII items"
            + (f" of types {list(types)}" if types else "")
            + "; check their spans."
        )
    return items


def _exact_by_type(result: ExtractionResult, types: Sequence[str]) -> dict[str, float]:
    by_type = result.by_type()
    return {name: by_type[name].exact_rate for name in types if name in by_type}


def _before_after(
    model: Any,
    tokenizer: Any,
    records: Sequence[PIIRecord],
    hooks: list,
    types: Sequence[str] | None,
    batch_size: int,
) -> dict[str, Any]:
    items = pii_items(tokenizer, records, types=types) if records else []
    if not items:
        return {
            "n_items": 0,
            "before": None,
            "after": None,
            "change": None,
            "similarity_before": None,
            "similarity_after": None,
            "by_type": {},
        }
    before = extraction_scores(model, items, batch_size=batch_size)
    after = extraction_scores(model, items, fwd_hooks=hooks, batch_size=batch_size)
    before_types, after_types = before.by_type(), after.by_type()
    return {
        "n_items": len(items),
        "before": before.exact_rate,
        "after": after.exact_rate,
        "change": after.exact_rate - before.exact_rate,
        "similarity_before": before.similarity,
        "similarity_after": after.similarity,
        "by_type": {
            name: {
                "before": before_types[name].exact_rate,
                "after": after_types[name].exact_rate,
                "change": after_types[name].exact_rate - before_types[name].exact_rate,
            }
            for name in before_types
        },
    }
