"""Fine-tune a model on PII records until it has memorized their PII, and cache the result.

A model only has privacy neurons to find once it has memorized personal data. ``memorize``
trains the model on the training records with the causal language-modeling loss until greedy
decoding from each PII item's prefix reproduces the PII (measured with the teacher-forced
exact match, which decides this in one forward pass). The trained weights and the training
summary are cached under a key of the starting weights, the tokenizer, the records and the
config, so the same call later only loads the weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_privacy.cache import atomic_folder, cache_entry
from tl_privacy.data.records import PIIRecord
from tl_privacy.data.tokenization import PIIItem, make_batches, pii_items
from tl_privacy.extraction import exact_match_teacher_forced
from tl_privacy.models import model_fingerprint, model_id
from tl_privacy.precision import resolve_precision

logger = logging.getLogger("tl_privacy")

TRAINABLE = ("all", "mlp")
PRECISIONS = ("auto", "float32", "bfloat16")
CACHE_FORMAT = 1
WEIGHTS_FILE = "weights.safetensors"
RESULT_FILE = "result.json"

# Learning rates used when MemorizeConfig.lr is None, by model size (see default_lr).
SMALL_MODEL_PARAMETERS = 10_000_000
SMALL_MODEL_LR = 3e-3
LARGE_MODEL_LR = 1e-3


@dataclass(frozen=True)
class MemorizeConfig:
    """Settings of the memorization fine-tune.

    Attributes:
        lr: AdamW learning rate; None picks one from the model size (see ``default_lr``).
        max_steps: Maximum number of optimizer steps.
        batch_size: Records per step.
        eval_every: Minimum number of steps between two measurements of training-item
            extraction. A measurement (one forward pass over all training items) runs when
            the estimate read off the training batches reaches ``target_extraction``, and
            after the last step.
        target_extraction: Stop once this fraction of the training PII items is extracted
            exactly (teacher-forced exact match).
        seed: Seed for ``torch.manual_seed`` and for the record order of each epoch.
        trainable: ``"all"`` trains every parameter. ``"mlp"`` trains only the MLP layers, so
            the memorized data ends up in the weights that privacy neurons are read from,
            and the embedding gets no gradient or optimizer state.
        weight_decay: AdamW weight decay.
        max_length: Truncate records to this many tokens (BOS included); None keeps them whole.
        precision: ``"bfloat16"`` runs the training forward and backward passes under bfloat16
            autocast (weights and optimizer stay float32), ``"float32"`` does not, and
            ``"auto"`` picks bfloat16 where the hardware computes it natively (see
            ``resolve_precision``). Extraction is always measured in the model's dtype.
        show_progress: Show a tqdm progress bar with the loss and the extraction rate.
    """

    lr: float | None = None
    max_steps: int = 400
    batch_size: int = 8
    eval_every: int = 10
    target_extraction: float = 0.95
    seed: int = 0
    trainable: str = "mlp"
    weight_decay: float = 0.0
    max_length: int | None = None
    precision: str = "auto"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive or None, got {self.lr}")
        for name in ("max_steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.target_extraction <= 1:
            raise ValueError(f"target_extraction must be in (0, 1], got {self.target_extraction}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 or None, got {self.max_length}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def cache_fields(self) -> dict[str, Any]:
        """Return the fields that change the trained weights (all but ``show_progress``)."""
        fields = dataclasses.asdict(self)
        fields.pop("show_progress")
        return fields


@dataclass
class MemorizeResult:
    """Summary of a memorization fine-tune.

    ``extraction_exact`` and ``heldout_extraction_exact`` are the teacher-forced exact
    extraction rates of the training and held-out PII items after training (the held-out
    rate is None without held-out records). ``extraction_curve`` contains ``(step,
    extraction_exact)`` pairs for every measurement, ``loss_curve`` the loss of every step.
    ``wall_time_s`` is the time the training took, also for a result loaded from the cache.
    """

    model: str
    steps: int
    wall_time_s: float
    seconds_per_step: float
    extraction_exact: float
    heldout_extraction_exact: float | None
    reached_target: bool
    lr: float
    trainable: str
    precision: str
    n_train_records: int
    n_train_items: int
    n_heldout_items: int
    loss_curve: list[float] = field(default_factory=list)
    extraction_curve: list[tuple[int, float]] = field(default_factory=list)
    cached: bool = False
    cache_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MemorizeResult:
        values = dict(values)
        values["extraction_curve"] = [tuple(pair) for pair in values.get("extraction_curve", [])]
        return cls(**values)


def default_lr(model: torch.nn.Module) -> float:
    """Return the learning rate used when ``MemorizeConfig.lr`` is None.

    3e-3 for models under 10M parameters and 1e-3 for larger ones. With the other defaults
    (MLP weights only, batch 8) and 32 synthetic e-mails, a 2-layer tiny model reached 95%
    exact extraction in about 100 steps at 3e-3, and SmolLM2-135M in 58 steps at 1e-3.
    """
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return SMALL_MODEL_LR if parameters < SMALL_MODEL_PARAMETERS else LARGE_MODEL_LR


def memorize(
    model: Any,
    corpus_or_records: Any,
    config: MemorizeConfig | None = None,
    *,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> MemorizeResult:
    """Fine-tune ``model`` in place until it extracts the training PII, or load cached weights.

    Args:
        model: A TransformerLens model with a tokenizer; it is left in eval mode.
        corpus_or_records: A ``PIICorpus`` (trained on ``.train``, ``.heldout`` measured) or a
            sequence of ``PIIRecord`` to train on. Repeated records are trained on once per
            epoch, like the others.
        config: Training settings; defaults to ``MemorizeConfig()``.
        cache: Load the weights from the cache when the same fine-tune was run before, and
            store them after training otherwise.
        cache_dir: Cache root; defaults to ``tl_privacy.cache.cache_dir()``.
    """
    config = config or MemorizeConfig()
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"{type(model).__name__} has no tokenizer; memorize tokenizes the records with "
            "model.tokenizer, so boot the model with one"
        )
    train, heldout = _split(corpus_or_records)
    train_items = pii_items(tokenizer, train)
    heldout_items = pii_items(tokenizer, heldout) if heldout else []
    if not train_items:
        raise ValueError(
            f"the {len(train)} training records have no PII spans, so there is nothing to "
            "memorize; label the records first (spans, or load_records with auto_label)"
        )

    entry = None
    if cache:
        key = _cache_key(model, tokenizer, train, heldout, config)
        entry = cache_entry("memorized", key, cache_dir)
        if (entry / RESULT_FILE).is_file():
            return _load_cached(model, entry)

    result = _train(model, tokenizer, train, train_items, heldout_items, config)
    if entry is not None:
        _store(model, entry, result, config)
        result.cache_path = str(entry)
    return result


def _split(corpus_or_records: Any) -> tuple[list[PIIRecord], list[PIIRecord]]:
    if hasattr(corpus_or_records, "train") and hasattr(corpus_or_records, "heldout"):
        train, heldout = list(corpus_or_records.train), list(corpus_or_records.heldout)
    elif isinstance(corpus_or_records, Sequence) and not isinstance(corpus_or_records, str):
        train, heldout = list(corpus_or_records), []
    else:
        raise TypeError(
            f"memorize expects a PIICorpus or a list of PIIRecord, got "
            f"{type(corpus_or_records).__name__}; load records with load_records()"
        )
    for index, record in enumerate([*train, *heldout]):
        if not isinstance(record, PIIRecord):
            raise TypeError(
                f"record {index} is a {type(record).__name__}, not a PIIRecord; "
                "convert dicts or files with load_records()"
            )
    if not train:
        raise ValueError("memorize needs at least one training record, got none")
    return _unique(train), _unique(heldout)


def _unique(records: list[PIIRecord]) -> list[PIIRecord]:
    """Drop repeated records (same text and spans), keeping the first of each."""
    seen: set[tuple[str, tuple]] = set()
    unique = []
    for record in records:
        key = (record.text, record.spans)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique


def trainable_parameters(model: Any, trainable: str) -> list[torch.nn.Parameter]:
    """Return the parameters that ``trainable`` ("all" or "mlp") selects, without duplicates.

    "mlp" takes the parameters of every ``model.blocks[i].mlp``, the modules whose
    ``hook_post`` carries the neuron activations that tl_privacy localizes.
    """
    if trainable == "all":
        modules = [model]
    elif trainable == "mlp":
        modules = [block.mlp for block in model.blocks]
    else:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    unique: dict[int, torch.nn.Parameter] = {}
    for module in modules:
        for parameter in module.parameters():
            unique.setdefault(id(parameter), parameter)
    return list(unique.values())


def _train(
    model: Any,
    tokenizer: Any,
    train: list[PIIRecord],
    train_items: list[PIIItem],
    heldout_items: list[PIIItem],
    config: MemorizeConfig,
) -> MemorizeResult:
    started = time.perf_counter()
    lr = config.lr if config.lr is not None else default_lr(model)
    precision = resolve_precision(model, config.precision)
    torch.manual_seed(config.seed)

    parameters = trainable_parameters(model, config.trainable)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay)
    batches = _batch_stream(tokenizer, train, config)
    device = next(iter(model.parameters())).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    tracker = _ExtractionTracker(train_items)

    loss_curve: list[float] = []
    extraction_curve: list[tuple[int, float]] = []
    extraction = 0.0
    last_measured = 0
    progress = tqdm(total=config.max_steps, desc="memorize", disable=not config.show_progress)
    # The model ends in eval mode also when a step raises or is interrupted.
    try:
        with _gradients_only_for(model, parameters):
            for step in range(1, config.max_steps + 1):
                model.train()
                batch = next(batches)
                with autocast:
                    loss, logits = _lm_loss(model, batch, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_curve.append(loss.item())
                tracker.update(batch, logits)

                # The full measurement costs a forward pass over every item, so it runs only when
                # the estimate from the training batches indicates that the target is reached.
                estimate = tracker.estimate()
                due = estimate is not None and estimate >= config.target_extraction
                due = due and step - last_measured >= config.eval_every
                if due or step == config.max_steps:
                    model.eval()
                    extraction = _exact_rate(model, train_items)
                    extraction_curve.append((step, extraction))
                    last_measured = step
                progress.update(1)
                progress.set_postfix(
                    loss=f"{loss_curve[-1]:.3f}",
                    extraction=f"{extraction if estimate is None else estimate:.2f}",
                )
                if last_measured == step and extraction >= config.target_extraction:
                    break
    finally:
        progress.close()
        model.eval()

    wall_time = time.perf_counter() - started
    steps = len(loss_curve)
    heldout = _exact_rate(model, heldout_items) if heldout_items else None
    logger.info(
        "memorized %d records in %d steps (%.1f s): exact extraction %.2f train, %s held out",
        len(train),
        steps,
        wall_time,
        extraction,
        "n/a" if heldout is None else f"{heldout:.2f}",
    )
    return MemorizeResult(
        model=model_id(model),
        steps=steps,
        wall_time_s=wall_time,
        seconds_per_step=wall_time / steps,
        extraction_exact=extraction,
        heldout_extraction_exact=heldout,
        reached_target=extraction >= config.target_extraction,
        lr=lr,
        trainable=config.trainable,
        precision=precision,
        n_train_records=len(train),
        n_train_items=len(train_items),
        n_heldout_items=len(heldout_items),
        loss_curve=loss_curve,
        extraction_curve=extraction_curve,
    )


class _ExtractionTracker:
    """Estimate training-item extraction from the logits of the training steps themselves.

    Each item's latest teacher-forced exact match is read off the batch that contained its
    record. The estimate lags the weights by up to one epoch, and while memorization
    improves that makes it a pessimistic one. Items truncated by ``max_length`` count as not
    extracted.
    """

    def __init__(self, items: list[PIIItem]) -> None:
        self.by_record: dict[int, list[tuple[int, PIIItem]]] = {}
        for index, item in enumerate(items):
            self.by_record.setdefault(item.record_index, []).append((index, item))
        self.latest: list[bool | None] = [None] * len(items)

    def update(self, batch: dict[str, Tensor], logits: Tensor) -> None:
        predictions = logits.detach().argmax(dim=-1).cpu()
        for row, record_index in enumerate(batch["record_index"].tolist()):
            for index, item in self.by_record.get(record_index, []):
                start = len(item.prefix_ids)
                stop = start + len(item.target_ids)
                # The logits at position p predict the token at p + 1.
                predicted = predictions[row, start - 1 : stop - 1]
                self.latest[index] = len(predicted) == len(item.target_ids) and bool(
                    (predicted == item.target_ids).all()
                )

    def estimate(self) -> float | None:
        """Return the fraction of items extracted, or None before every item was seen."""
        if any(value is None for value in self.latest):
            return None
        return sum(bool(value) for value in self.latest) / len(self.latest)


def _batch_stream(
    tokenizer: Any, records: list[PIIRecord], config: MemorizeConfig
) -> Iterator[dict[str, Tensor]]:
    """Yield training batches forever, reshuffling the records every epoch."""
    epoch_seeds = random.Random(config.seed)
    while True:
        yield from make_batches(
            tokenizer,
            records,
            config.batch_size,
            shuffle=True,
            seed=epoch_seeds.getrandbits(32),
            max_length=config.max_length,
        )


def _lm_loss(
    model: Any, batch: dict[str, Tensor], device: torch.device
) -> tuple[Float[Tensor, ""], Float[Tensor, "batch pos d_vocab"]]:
    """Return the mean next-token cross-entropy over the real tokens of a right-padded batch,
    and the logits."""
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    logits = model(input_ids, attention_mask=attention_mask, return_type="logits")
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=-100,
    )
    return loss, logits


def _exact_rate(model: Any, items: list[PIIItem]) -> float:
    # Counted in Python, since a float32 mean turns 19/20 into 0.94999999 < 0.95.
    return int(exact_match_teacher_forced(model, items).sum()) / len(items)


@contextmanager
def _gradients_only_for(model: Any, parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    """Turn off gradients of all other parameters for the block, then restore the flags."""
    trainable = {id(parameter) for parameter in parameters}
    saved = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in saved:
        parameter.requires_grad_(id(parameter) in trainable)
    try:
        yield
    finally:
        for parameter, requires_grad in saved:
            parameter.requires_grad_(requires_grad)


def _cache_key(
    model: Any,
    tokenizer: Any,
    train: list[PIIRecord],
    heldout: list[PIIRecord],
    config: MemorizeConfig,
) -> str:
    """Hash everything the trained weights and the stored summary depend on."""

    def records(rows: list[PIIRecord]) -> list[Any]:
        return [[r.text, [[s.start, s.end, s.type] for s in r.spans]] for r in rows]

    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    payload = {
        "format": CACHE_FORMAT,
        "model": model_fingerprint(model),
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
        "train": records(train),
        "heldout": records(heldout),
        "config": config.cache_fields(),
        "precision": resolve_precision(model, config.precision),
    }
    encoded = json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()


def _named_trainable(model: Any, trainable: str) -> dict[str, torch.nn.Parameter]:
    selected = {id(parameter) for parameter in trainable_parameters(model, trainable)}
    return {name: p for name, p in model.named_parameters() if id(p) in selected}


def _store(model: Any, entry: Path, result: MemorizeResult, config: MemorizeConfig) -> None:
    from safetensors.torch import save_file

    tensors = {
        name: parameter.detach().cpu().contiguous().clone()
        for name, parameter in _named_trainable(model, config.trainable).items()
    }
    with atomic_folder(entry) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE))
        (staging / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=1))
    logger.info("stored the memorized weights in %s", entry)


def _load_cached(model: Any, entry: Path) -> MemorizeResult:
    """Copy the cached weights into ``model`` and return the stored summary."""
    from safetensors.torch import load_file

    result = MemorizeResult.from_dict(json.loads((entry / RESULT_FILE).read_text()))
    tensors = load_file(str(entry / WEIGHTS_FILE))
    parameters = _named_trainable(model, result.trainable)
    missing = sorted(set(tensors) ^ set(parameters))
    if missing:
        raise ValueError(
            f"cache entry {entry} does not match the model's parameters (first difference: "
            f"{missing[0]!r}); delete the entry and run memorize again"
        )
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(tensors[name].to(parameter.device, parameter.dtype))
    model.eval()
    result.cached = True
    result.cache_path = str(entry)
    logger.info("loaded memorized weights from %s (%d steps)", entry, result.steps)
    return result
