"""Adversarial training of hard-concrete gates to localize privacy neurons.

The model's weights stay frozen; only the gates' ``log_alpha`` trains, on

    loss = pii_term + keep_weight * keep_term + (l0_weight + lambda) * E[closed] / B

where ``pii_term`` pushes down the probability of the PII tokens (bounded, see
:mod:`tl_privacy.objectives`), ``keep_term`` keeps the predictions on the other
tokens, ``E[closed]`` is the expected number of closed gates and ``B`` the
neuron budget. ``lambda`` is a Lagrange multiplier raised by dual ascent while
``E[closed]`` exceeds the budget, so the budget holds on any model without
hand-tuning an L0 weight.

Neurons are then ranked by ``-log_alpha``. By default the set is the smallest
prefix of that ranking, at most the budget, whose zero-ablation cuts the
teacher-forced exact match of the PII strings by a target fraction: stochastic
gates often settle partly closed, so the ranking carries more than the few gates
that close outright (see ``LocalizationConfig.selection``).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from tl_privacy.data.records import type_tuple
from tl_privacy.hooks import attached, check_model, eval_mode, model_logits
from tl_privacy.masks import HardConcreteMask
from tl_privacy.models import model_fingerprint
from tl_privacy.neurons import PrivacyNeurons
from tl_privacy.objectives import (
    KeepLossForm,
    PIILossForm,
    check_finite,
    keep_loss_from_rows,
    pii_runs,
    pii_suppression_from_rows,
    shifted_targets,
)
from tl_privacy.precision import autocast, resolve_precision, weights_cast_once
from tl_privacy.readout import predicting_logits

logger = logging.getLogger("tl_privacy")

DEFAULT_PII_TYPES = ("EMAIL", "PHONE", "NAME", "ADDRESS")
"""Type names in the order of ``pii_type_ids`` produced by :mod:`tl_privacy.data.tokenization`."""


def check_budget_value(budget: Any) -> None:
    """Raise ValueError unless ``budget`` is None, a fraction in (0, 1) or a whole neuron
    count >= 1 (an int, or a float with no fractional part)."""
    valid = budget is None or (
        isinstance(budget, (int, float))
        and not isinstance(budget, bool)
        and math.isfinite(budget)
        and (0 < budget < 1 or (budget >= 1 and float(budget).is_integer()))
    )
    if not valid:
        raise ValueError(
            "budget must be a fraction in (0, 1), a whole neuron count >= 1, or None; "
            f"got {budget!r}."
        )


@dataclass
class LocalizationConfig:
    """Settings of :func:`localize`.

    Attributes:
        steps: optimizer steps; each is one forward and one backward pass of one batch.
        lr: Adam learning rate on ``log_alpha``.
        batch_size: rows per batch when ``localize`` is given whole tensors to split.
        temperature: hard-concrete temperature (> 0).
        init_open_prob: probability that a gate is non-zero at the start.
        budget: upper bound on the set: a fraction of all MLP neurons if < 1 (e.g.
            0.01), a neuron count if >= 1, or None for no bound (then only
            ``l0_weight`` limits the set).
        l0_weight: weight of the expected number of closed gates, per budget
            (per 1% of all neurons when there is no budget).
        dual_lr: step size of the Lagrange multiplier that enforces the budget.
        pii_loss: ``"unlikelihood"``, ``"capped_ce"`` or ``"sequence"``, all bounded (see
            :func:`tl_privacy.objectives.pii_suppression_loss`).
        keep_loss: ``"kl"`` (to the unmasked model's own predictions) or ``"ce"``.
        keep_weight: weight of the keep term.
        pii_types: PII types to suppress, or None for all; tokens of the other
            types are then neither suppressed nor kept.
        type_names: the names behind the batches' ``pii_type_ids``.
        seed: seed of the gate noise; the same seed gives the same set on CPU.
        device: device of the mask and batches; None uses the model's device.
        reference_cache_mb: memory for caching the unmasked model's predictions
            (``kl`` form) across steps; past it they are recomputed each step.
        precision: ``"bfloat16"`` runs the model's forward pass under bfloat16
            autocast (the gates and their optimizer stay float32), ``"float32"``
            does not, and ``"auto"`` picks bfloat16 where the device computes it
            natively (see :func:`tl_privacy.precision.resolve_precision`).
        selection: how the set is read off the trained gates. ``"sufficient"``
            ranks neurons by ``-log_alpha`` and takes the smallest prefix of the
            ranking, at most the budget, whose zero-ablation cuts the teacher-forced
            exact match of the PII strings in the batches by ``target_reduction``
            (or the whole budget when no prefix does). ``"closed"``
            takes the gates with ``P(gate = 0) > 0.5``, at most the budget.
            ``"budget"`` takes exactly the budget's number of top-ranked neurons.
        target_reduction: relative cut of the exact-match rate that ``"sufficient"``
            aims for (0.9 = 90%).
        show_progress: show a tqdm bar.
    """

    steps: int = 200
    lr: float = 0.1
    batch_size: int = 8
    temperature: float = 2.0 / 3.0
    init_open_prob: float = 0.99
    budget: float | int | None = 0.01
    l0_weight: float = 0.1
    dual_lr: float = 0.05
    pii_loss: PIILossForm = "unlikelihood"
    keep_loss: KeepLossForm = "kl"
    keep_weight: float = 1.0
    pii_types: tuple[str, ...] | None = None
    type_names: tuple[str, ...] = DEFAULT_PII_TYPES
    seed: int = 0
    device: str | None = None
    reference_cache_mb: float = 1024.0
    precision: str = "auto"
    selection: SelectionRule = "sufficient"
    target_reduction: float = 0.9
    show_progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
        check_budget_value(self.budget)
        if self.pii_loss not in ("sequence", "unlikelihood", "capped_ce"):
            raise ValueError(
                "pii_loss must be 'sequence', 'unlikelihood' or 'capped_ce', "
                f"got {self.pii_loss!r}."
            )
        if self.keep_loss not in ("kl", "ce"):
            raise ValueError(f"keep_loss must be 'kl' or 'ce', got {self.keep_loss!r}.")
        if self.pii_types is not None:
            self.pii_types = type_tuple(self.pii_types, "pii_types")
            unknown = [t for t in self.pii_types if t not in self.type_names]
            if unknown:
                raise ValueError(
                    f"pii_types {unknown} are not among type_names {list(self.type_names)}."
                )
        self.type_names = type_tuple(self.type_names, "type_names")
        if self.precision not in ("auto", "bfloat16", "float32"):
            raise ValueError(
                f"precision must be 'auto', 'bfloat16' or 'float32', got {self.precision!r}."
            )
        if self.selection not in ("sufficient", "closed", "budget"):
            raise ValueError(
                f"selection must be 'sufficient', 'closed' or 'budget', got {self.selection!r}."
            )
        if self.selection == "budget" and self.budget is None:
            raise ValueError("selection='budget' needs a budget.")
        if not 0.0 < self.target_reduction <= 1.0:
            raise ValueError(f"target_reduction must be in (0, 1], got {self.target_reduction!r}.")

    def budget_count(self, n_neurons: int) -> int | None:
        """Convert the budget to a number of neurons out of ``n_neurons``; None means no budget."""
        if self.budget is None:
            return None
        if self.budget < 1:
            return max(1, int(round(self.budget * n_neurons)))
        count = int(self.budget)
        if count > n_neurons:
            raise ValueError(f"budget {count} exceeds the model's {n_neurons} MLP neurons.")
        return count


@dataclass
class LocalizationHistory:
    """Per-step values of the loss terms, for plots and checks."""

    pii: list[float] = field(default_factory=list)
    keep: list[float] = field(default_factory=list)
    expected_closed: list[float] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)
    multiplier: list[float] = field(default_factory=list)


SelectionRule = Literal["sufficient", "closed", "budget"]
Batch = dict[str, torch.Tensor]
BatchSource = Mapping[str, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]]


def as_batches(
    batches: BatchSource,
    batch_size: int,
    device: torch.device | str,
    d_vocab: int | None = None,
) -> list[Batch]:
    """Normalise the input of :func:`localize` to a list of batches on ``device``.

    Accepts one dict of whole tensors (split into rows of ``batch_size``) or any
    iterable of such dicts. Each needs ``input_ids``, ``pii_mask`` and optionally
    ``attention_mask`` (all ones when missing) and ``pii_type_ids``. With a positive
    ``d_vocab``, token ids outside ``[0, d_vocab)`` (from another model's tokenizer) raise
    ValueError.
    """
    if isinstance(batches, Mapping):
        whole = _check_batch(batches, 0, d_vocab)
        n_rows = whole["input_ids"].shape[0]
        items = [
            {key: value[start : start + batch_size] for key, value in whole.items()}
            for start in range(0, n_rows, batch_size)
        ]
    else:
        items = [_check_batch(batch, index, d_vocab) for index, batch in enumerate(batches)]
    if not items:
        raise ValueError("localize got no batches; give at least one batch with PII tokens.")
    return [{key: value.to(device) for key, value in batch.items()} for batch in items]


def _check_batch(batch: Mapping[str, Any], index: int, d_vocab: int | None = None) -> Batch:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"batch {index} is a {type(batch).__name__}; expected a dict with input_ids, "
            "attention_mask and pii_mask tensors."
        )
    missing = [key for key in ("input_ids", "pii_mask") if key not in batch]
    if missing:
        raise ValueError(f"batch {index} is missing {missing}; it has {sorted(batch)}.")

    input_ids = torch.as_tensor(batch["input_ids"])
    if input_ids.dim() != 2:
        raise ValueError(
            f"batch {index}: input_ids must be [batch, pos], got shape {tuple(input_ids.shape)}."
        )
    if isinstance(d_vocab, int) and d_vocab > 0 and input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= d_vocab:
            raise ValueError(
                f"batch {index} has token ids from {low} to {high}, but the model's "
                f"vocabulary has ids 0 to {d_vocab - 1}; tokenize with the model's own tokenizer."
            )
    result: Batch = {"input_ids": input_ids.long()}
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    result["attention_mask"] = torch.as_tensor(attention_mask).long()
    result["pii_mask"] = torch.as_tensor(batch["pii_mask"]).bool()
    if "pii_type_ids" in batch:
        result["pii_type_ids"] = torch.as_tensor(batch["pii_type_ids"]).long()
    for key, value in result.items():
        if value.shape != input_ids.shape:
            raise ValueError(
                f"batch {index}: {key} has shape {tuple(value.shape)}, input_ids has "
                f"{tuple(input_ids.shape)}."
            )
    # Pad positions are never PII, whatever labels the caller gives.
    result["pii_mask"] = result["pii_mask"] & result["attention_mask"].bool()
    return result


def restrict_to_types(
    batches: list[Batch], pii_types: tuple[str, ...] | None, type_names: tuple[str, ...]
) -> list[Batch]:
    """Add a ``suppress_mask`` that keeps only the PII tokens of ``pii_types``."""
    if pii_types is None:
        return batches
    type_ids = torch.tensor([type_names.index(t) for t in pii_types])
    restricted = []
    for index, batch in enumerate(batches):
        if "pii_type_ids" not in batch:
            raise ValueError(
                f"batch {index} has no pii_type_ids, which restricting to pii_types "
                f"{list(pii_types)} needs."
            )
        suppress = torch.isin(batch["pii_type_ids"], type_ids.to(batch["pii_type_ids"].device))
        restricted.append({**batch, "suppress_mask": suppress & batch["pii_mask"]})
    return restricted


@contextmanager
def frozen(model: Any) -> Iterator[None]:
    """Freeze every parameter of ``model`` and put it in eval mode; restore both after,
    each submodule's training flag included (see :func:`tl_privacy.hooks.eval_mode`)."""
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    for param in params:
        param.requires_grad_(False)
    try:
        with eval_mode(model):
            yield
    finally:
        for param, flag in zip(params, requires_grad, strict=True):
            param.requires_grad_(flag)


# The batch tensors that decide a reference entry: its tokens, padding and PII positions.
_BATCH_KEYS = ("input_ids", "attention_mask", "pii_mask")


class ReferenceCache:
    """The unmasked model's log-probabilities at the keep positions, by batch position.

    Each entry is computed on first use and kept in float16 if it fits in ``limit_mb``. An
    entry that does not fit is recomputed on every use. The entries depend only on the
    model's weights, the batch and the precision, not on the gates or on ``pii_types``,
    because the keep positions are the non-PII tokens of every type. One cache can
    therefore serve several runs over the same batches in the same order: the demo shares
    one between its main localization and the per-type runs.

    The cache binds to the model and precision of its first lookup and raises ValueError
    for others. It also raises when a batch differs from the one its entry was computed
    on. It cannot see a change of the weights themselves: make a new cache after training
    the model further.
    """

    def __init__(self, limit_mb: float = 1024.0) -> None:
        if not limit_mb >= 0:
            raise ValueError(f"limit_mb must be >= 0 (MiB), got {limit_mb}.")
        self.limit_bytes = limit_mb * 2**20
        self.used_bytes = 0.0
        self.entries: dict[int, torch.Tensor] = {}
        # CPU copies of each stored entry's batch tensors, to check later lookups against.
        self._batches: dict[int, dict[str, torch.Tensor]] = {}
        self._model_id: int | None = None
        self._precision: str | None = None

    def get(
        self,
        index: int,
        batch: Batch,
        compute: Callable[[], torch.Tensor],
        *,
        model: Any,
        precision: str,
    ) -> torch.Tensor:
        """Return the entry of batch ``index``, computing it with ``compute()`` if absent.

        ``precision`` is the resolved one (``"bfloat16"`` or ``"float32"``).
        """
        self._bind(model, precision)
        if index in self.entries:
            self._check_batch(index, batch)
            return self.entries[index]

        value = compute()
        # float16 halves the memory; log-probabilities keep about 3 significant digits.
        size = value.numel() * 2
        if self.used_bytes + size <= self.limit_bytes:
            self.entries[index] = value.to(torch.float16)
            self._batches[index] = {key: batch[key].detach().cpu().clone() for key in _BATCH_KEYS}
            self.used_bytes += size
        return value

    def _bind(self, model: Any, precision: str) -> None:
        if self._model_id is None:
            self._model_id, self._precision = id(model), precision
            return
        if self._model_id != id(model):
            raise ValueError(
                "this ReferenceCache was filled by another model. Pass a new ReferenceCache "
                "for each model."
            )
        if self._precision != precision:
            raise ValueError(
                f"this ReferenceCache was filled at precision {self._precision!r}, not "
                f"{precision!r}. Pass a new ReferenceCache or the same precision."
            )

    def _check_batch(self, index: int, batch: Batch) -> None:
        stored = self._batches[index]
        if not all(torch.equal(stored[key], batch[key].detach().cpu()) for key in _BATCH_KEYS):
            raise ValueError(
                f"batch {index} differs from the batch this ReferenceCache computed its entry "
                "on. Pass the same batches in the same order, or a new ReferenceCache."
            )


class Localizer:
    """Runs the adversarial mask training step by step; :func:`localize` drives it.

    While the localizer is open (``with Localizer(model, config) as localizer:``),
    the model is frozen and in eval mode and the gate hooks are attached; on exit
    all of that is undone, also when a step raises. Under bfloat16 the weights are
    marked as requiring grad while it is open, so that autocast casts them once per
    run (see :func:`tl_privacy.precision.weights_cast_once`). Steps take gradients of
    the gates only, so the weights get none. Code inside the block runs under bfloat16
    autocast, and the activations its hooks see require grad.

    ``references`` shares the unmasked model's predictions with other runs over the same
    batches (see :class:`ReferenceCache`); by default each localizer has its own cache of
    ``config.reference_cache_mb``.

    Attributes:
        mask: the :class:`HardConcreteMask` being trained.
        history: per-step values of the loss terms.
        passes: model forward and backward passes so far.
    """

    def __init__(
        self,
        model: Any,
        config: LocalizationConfig | None = None,
        references: ReferenceCache | None = None,
    ) -> None:
        self.model = model
        self.config = config or LocalizationConfig()
        self.n_layers, self.d_mlp = check_model(model)
        self.n_neurons = self.n_layers * self.d_mlp
        self.budget = self.config.budget_count(self.n_neurons)
        self.device = torch.device(self.config.device) if self.config.device else _device_of(model)

        self.mask = HardConcreteMask(
            self.n_layers,
            self.d_mlp,
            temperature=self.config.temperature,
            init_open_prob=self.config.init_open_prob,
            seed=self.config.seed,
        ).to(self.device)
        self.mask.train()
        self.optimizer = torch.optim.Adam([self.mask.log_alpha], lr=self.config.lr)
        self.history = LocalizationHistory()
        self.passes = {"forward": 0, "backward": 0}
        self.multiplier = 0.0
        self._budget_scale = float(self.budget or max(1, self.n_neurons // 100))
        if references is None:
            references = ReferenceCache(self.config.reference_cache_mb)
        self._references = references
        self._exit_stack: ExitStack | None = None
        self._data: list[Batch] = []

    def __enter__(self) -> Localizer:
        stack = ExitStack()
        stack.enter_context(frozen(self.model))
        stack.enter_context(weights_cast_once(self.model, self.config.precision))
        stack.enter_context(attached(self.model, self.mask.fwd_hooks()))
        self._exit_stack = stack
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._exit_stack is not None:
            self._exit_stack.close()
            self._exit_stack = None

    def prepare(self, batches: BatchSource) -> list[Batch]:
        """Check and move the batches, and narrow them to ``config.pii_types``."""
        d_vocab = getattr(self.model.cfg, "d_vocab", None)
        data = as_batches(batches, self.config.batch_size, self.device, d_vocab)
        data = restrict_to_types(data, self.config.pii_types, self.config.type_names)
        if not any(bool(b.get("suppress_mask", b["pii_mask"]).any()) for b in data):
            types = f" of types {list(self.config.pii_types)}" if self.config.pii_types else ""
            raise ValueError(
                f"No batch has a PII token to suppress{types}; check the records' spans and "
                "the tokenization."
            )
        self._data = data
        return data

    def _reference(self, key: int | None, batch: Batch) -> torch.Tensor | None:
        if self.config.keep_loss != "kl":
            return None

        def compute() -> torch.Tensor:
            self.passes["forward"] += 1
            _, _, keep = shifted_targets(batch)
            with torch.no_grad(), self.mask.bypassed(), self._autocast():
                (rows,) = predicting_logits(
                    self.model, batch["input_ids"], batch["attention_mask"], [keep]
                )
            return torch.log_softmax(rows.float(), dim=-1)

        if key is None:
            key = next((i for i, known in enumerate(self._data) if known is batch), None)
        if key is None:
            return compute()
        precision = resolve_precision(self.model, self.config.precision)
        return self._references.get(key, batch, compute, model=self.model, precision=precision)

    def _autocast(self):
        return autocast(self.model, self.config.precision)

    def step(self, batch: Batch, key: int | None = None) -> None:
        """Take one optimizer step of the gates on ``batch``.

        ``key`` names the batch's entry in the reference cache (the unmasked model's
        predictions for the KL term). By default a batch returned by :meth:`prepare` uses
        its position there, and any other batch gets its reference computed afresh, which
        costs one more forward pass.
        """
        if self._exit_stack is None:
            raise RuntimeError("Use the Localizer inside `with Localizer(model, config) as loc:`.")
        if not torch.is_grad_enabled():
            raise RuntimeError(
                "Localization needs gradients, but gradients are off (torch.no_grad() or "
                "torch.inference_mode() is active). Call localize outside that block."
            )
        config = self.config
        reference = self._reference(key, batch)

        _, pii, keep = shifted_targets(batch)
        with self._autocast():
            pii_rows, keep_rows = predicting_logits(
                self.model, batch["input_ids"], batch["attention_mask"], [pii, keep]
            )
        pii_term = pii_suppression_from_rows(pii_rows, batch, config.pii_loss)
        keep_term = keep_loss_from_rows(keep_rows, batch, config.keep_loss, reference)
        expected_closed = self.mask.expected_closed()
        l0_term = (config.l0_weight + self.multiplier) * expected_closed / self._budget_scale
        check_finite(pii_term, "PII suppression")
        check_finite(keep_term, "keep")
        check_finite(l0_term, "L0")

        loss = pii_term + config.keep_weight * keep_term + l0_term
        self.optimizer.zero_grad(set_to_none=True)
        # Gradients of the gates only, because weights_cast_once makes the weights require grad.
        loss.backward(inputs=[self.mask.log_alpha])
        self.optimizer.step()
        self.passes["forward"] += 1
        self.passes["backward"] += 1

        if self.budget is not None:
            # Dual ascent: the multiplier grows while the expected set exceeds the budget.
            excess = float(expected_closed.detach()) / self.budget - 1.0
            self.multiplier = max(0.0, self.multiplier + config.dual_lr * excess)

        with torch.no_grad():
            closed_now = int(self.mask.closed().sum())
        self.history.pii.append(float(pii_term.detach()))
        self.history.keep.append(float(keep_term.detach()))
        self.history.expected_closed.append(float(expected_closed.detach()))
        self.history.closed.append(closed_now)
        self.history.multiplier.append(self.multiplier)

    def run(self, batches: BatchSource) -> PrivacyNeurons:
        """Train for ``config.steps`` steps, cycling through the batches, and select the set."""
        data = self.prepare(batches)
        start = time.perf_counter()
        show = self.config.show_progress
        progress = tqdm(range(self.config.steps), desc="localize", disable=not show)
        # Inside an open ``with localizer:`` block, entering again would replace the block's
        # exit stack, and its exit would then no longer restore the model.
        with nullcontext() if self._exit_stack is not None else self:
            for step in progress:
                index = step % len(data)
                self.step(data[index], key=index)
                progress.set_postfix(
                    pii=f"{self.history.pii[-1]:.3f}",
                    keep=f"{self.history.keep[-1]:.4f}",
                    l0=f"{self.history.expected_closed[-1]:.1f}",
                    closed=self.history.closed[-1],
                    refresh=False,
                )
            neurons = self.result()
        neurons.stats["wall_time_s"] = time.perf_counter() - start
        self._log(neurons)
        return neurons

    def result(self) -> PrivacyNeurons:
        """Read the set off the current gates by ``config.selection``, with the run's stats.

        ``"sufficient"`` runs forward passes over the batches given to :meth:`run`
        (or :meth:`prepare`), so call it inside the ``with`` block.
        """
        # Deterministic gates for the selection; a later step() samples again.
        was_training = self.mask.training
        self.mask.eval()
        try:
            rule = self.config.selection
            if rule == "closed":
                neurons = _select_closed(self.mask, self.budget)
            elif rule == "budget":
                neurons = _ranked(self.mask, self.budget)
            else:
                neurons = self._select_sufficient()
        finally:
            self.mask.train(was_training)

        neurons.model_name = getattr(self.model.cfg, "model_name", None)
        neurons.pii_types = self.config.pii_types or self.config.type_names
        neurons.config = asdict(self.config)
        neurons.stats = {
            **neurons.stats,
            "forward_passes": self.passes["forward"],
            "backward_passes": self.passes["backward"],
            "budget": self.budget,
            "history": asdict(self.history),
        }
        return neurons

    def _log(self, neurons: PrivacyNeurons) -> None:
        logger.info(
            "localize: %d privacy neuron%s (%.3f%% of %d) in %.1f s, %d forward and %d "
            "backward passes",
            neurons.count,
            "" if neurons.count == 1 else "s",
            100 * neurons.fraction,
            self.n_neurons,
            neurons.stats["wall_time_s"],
            neurons.stats["forward_passes"],
            neurons.stats["backward_passes"],
        )

    def exact_match_rate(self, neurons: PrivacyNeurons | None = None) -> float:
        """Teacher-forced exact match of the PII strings in the prepared batches.

        A string (a run of consecutive PII tokens) counts when the argmax at each of
        its tokens is that token, which is when greedy decoding reproduces it. The
        gates are bypassed; ``neurons``, when given, are zero-ablated.
        """
        hooks = [] if neurons is None else neurons.ablation_hooks()
        matched = total = 0
        with torch.no_grad(), self.mask.bypassed(), attached(self.model, hooks), self._autocast():
            for batch in self._data:
                if not bool(batch.get("suppress_mask", batch["pii_mask"]).any()):
                    continue  # a keep-only batch has no string to match
                self.passes["forward"] += 1
                logits = model_logits(self.model, batch["input_ids"], batch["attention_mask"])
                hits, count = _string_matches(logits, batch)
                matched += hits
                total += count
        return matched / max(total, 1)

    def _select_sufficient(self) -> PrivacyNeurons:
        limit = self.budget or self.n_neurons
        clean = self.exact_match_rate()
        goal = clean * (1.0 - self.config.target_reduction)
        ranked = _ranked(self.mask, limit)

        # Binary search for the smallest prefix meeting the goal; ablating more of the
        # ranking cuts leakage further in practice, though not by construction.
        low, high = 1, limit
        best_k, best_rate = limit, self.exact_match_rate(ranked.top_k(limit))
        if best_rate <= goal:
            while low < high:
                middle = (low + high) // 2
                rate = self.exact_match_rate(ranked.top_k(middle))
                if rate <= goal:
                    high, best_k, best_rate = middle, middle, rate
                else:
                    low = middle + 1
        neurons = ranked.top_k(best_k)
        neurons.stats = {"exact_match_clean": clean, "exact_match_ablated": best_rate}
        return neurons


def localize(
    model: Any,
    batches: BatchSource,
    config: LocalizationConfig | None = None,
    *,
    model_name: str | None = None,
    references: ReferenceCache | None = None,
) -> PrivacyNeurons:
    """Localize the MLP neurons that hold the PII in ``batches`` by training hard-concrete gates.

    Args:
        model: a TransformerLens model (see :func:`tl_privacy.hooks.check_model`).
        batches: dicts with ``input_ids`` ``[batch, pos]``, ``attention_mask``
            ``[batch, pos]`` (1 = real token) and a boolean ``pii_mask`` ``[batch, pos]``
            (plus ``pii_type_ids`` when ``config.pii_types`` is set), or one dict of
            whole tensors to split into batches.
        config: settings; defaults to :class:`LocalizationConfig()`.
        model_name: stored with the result; defaults to ``model.cfg.model_name``.
        references: the unmasked model's keep-position predictions, shared with other runs
            over the same batches (see :class:`ReferenceCache`); None computes them anew.

    Returns:
        The neurons whose gates closed, with ``scores = -log_alpha``, the gate
        values, the settings, ``stats`` (wall time, passes, the loss history) and the
        fingerprint of the model's weights.
        The model's parameters, their ``requires_grad`` and its train/eval mode are
        as they were before the call, and no hook stays attached.
    """
    neurons = Localizer(model, config, references).run(batches)
    if model_name is not None:
        neurons.model_name = model_name
    neurons.model_fingerprint = model_fingerprint(model)
    return neurons


def _ranked(mask: HardConcreteMask, k: int | None) -> PrivacyNeurons:
    """Select the ``k`` neurons with the lowest ``log_alpha``, scored by ``-log_alpha``."""
    with torch.no_grad():
        scores = -mask.log_alpha.detach().cpu()
        gates = mask.deterministic_gates().detach().cpu()
    count = scores.numel() if k is None else k
    neurons = PrivacyNeurons.from_scores(scores, count, method="hard_concrete")
    neurons.gates = gates
    return neurons


def _select_closed(mask: HardConcreteMask, budget: int | None) -> PrivacyNeurons:
    """Select the gates more likely closed than not, at most ``budget`` of them."""
    with torch.no_grad():
        closed = int(mask.closed().sum())
    if closed == 0:
        warnings.warn(
            "No gate closed during localization; the set is empty. Train longer, raise lr or "
            "lower l0_weight, or use selection='sufficient'.",
            stacklevel=4,
        )
    # Closed gates are those with the lowest log_alpha, so the top-k scores are closed ones.
    return _ranked(mask, closed if budget is None else min(closed, budget))


def _string_matches(logits: torch.Tensor, batch: Batch) -> tuple[int, int]:
    """Count PII strings whose every token is the argmax, and all PII strings, in a batch."""
    targets, pii, _ = shifted_targets(batch)
    if not pii.any():
        return 0, 0
    wrong = (logits[:, :-1].argmax(-1) != targets) & pii
    runs = pii_runs(pii)
    n_runs = int(runs[pii].max()) + 1
    errors = torch.zeros(n_runs, device=logits.device).index_add(0, runs[pii], wrong[pii].float())
    return int((errors == 0).sum()), n_runs


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
