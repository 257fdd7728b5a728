"""Baseline ways to pick privacy neurons, for comparison with the learned masks.

Every method scores each MLP neuron (``[n_layers, d_mlp]``, higher = more tied to the PII)
and :func:`select` keeps exactly the ``k`` highest, as a :class:`PrivacyNeurons` whose
``stats`` record the wall time and the model's forward and backward passes:

- ``random``: uniform scores from a seeded ``torch.Generator``.
- ``activation``: mean ``hook_post`` activation at PII positions minus the mean at the
  other real positions.
- ``integrated_gradients``: integrated gradients of the PII tokens' log-probability with
  respect to the ``hook_post`` activations, scaled from 0 to their value (as in DEPN, Wu et
  al., EMNLP 2023), summed over PII positions.
- ``slimming``: a coefficient in [0, 1] per neuron, trained with the localization objective
  plus an L1 penalty on ``1 - coefficient``; the score is ``1 - coefficient``.

A "PII position" is a position whose next token is a PII token (of ``pii_types`` when set),
because that is where the model recalls the PII; the other positions are those whose next
token is a real non-PII token. This is the split the localization objective uses
(:func:`tl_privacy.objectives.shifted_targets`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_privacy.data.records import type_tuple
from tl_privacy.hooks import attached, check_model, mlp_post_name, model_logits
from tl_privacy.localization import (
    DEFAULT_PII_TYPES,
    Batch,
    BatchSource,
    LocalizationConfig,
    ReferenceCache,
    as_batches,
    frozen,
    restrict_to_types,
)
from tl_privacy.models import model_fingerprint
from tl_privacy.neurons import PrivacyNeurons
from tl_privacy.objectives import (
    KeepLossForm,
    PIILossForm,
    check_finite,
    keep_loss_from_rows,
    pii_suppression_from_rows,
    row_log_probs,
    shifted_targets,
)
from tl_privacy.precision import autocast, resolve_precision, weights_cast_once
from tl_privacy.readout import predicting_logits

logger = logging.getLogger("tl_privacy")

BASELINE_METHODS = ("random", "activation", "integrated_gradients", "slimming")

IGMode = Literal["joint", "per_layer"]


@dataclass(frozen=True)
class BaselineConfig:
    """Settings of the baselines.

    Attributes:
        batch_size: rows per batch when the batches are given as one dict of whole tensors.
        device: device of the batches; None uses the model's device.
        pii_types: PII types the neurons should hold, or None for all.
        type_names: the names behind the batches' ``pii_type_ids``.
        max_batches: use at most this many batches for ``activation`` and
            ``integrated_gradients`` (None: all).
        ig_steps: Riemann steps of integrated gradients (DEPN uses 20).
        ig_mode: ``"joint"`` scales every layer's activations together, so each step is one
            forward and one backward pass per batch. ``"per_layer"`` scales one layer at a
            time, as DEPN does, at ``n_layers`` times the cost.
        slimming_steps: optimizer steps of slimming, each one forward and one backward pass.
        slimming_lr: Adam learning rate of the coefficients.
        l1_weight: weight of the L1 penalty, per ``k`` neurons fully switched off.
        pii_loss, keep_loss, keep_weight: the localization objective's terms (see
            :class:`tl_privacy.localization.LocalizationConfig`).
        precision: autocast of the model's passes, as in
            :class:`tl_privacy.localization.LocalizationConfig` (scores stay float32).
        show_progress: show a tqdm bar for slimming and integrated gradients.
    """

    batch_size: int = 8
    device: str | None = None
    pii_types: tuple[str, ...] | None = None
    type_names: tuple[str, ...] = DEFAULT_PII_TYPES
    max_batches: int | None = None
    ig_steps: int = 20
    ig_mode: IGMode = "joint"
    slimming_steps: int = 200
    slimming_lr: float = 0.05
    l1_weight: float = 0.1
    pii_loss: PIILossForm = "unlikelihood"
    keep_loss: KeepLossForm = "kl"
    keep_weight: float = 1.0
    precision: str = "float32"
    show_progress: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "ig_steps", "slimming_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"max_batches must be at least 1 or None, got {self.max_batches}.")
        if self.ig_mode not in ("joint", "per_layer"):
            raise ValueError(f"ig_mode must be 'joint' or 'per_layer', got {self.ig_mode!r}.")
        if self.precision not in ("auto", "bfloat16", "float32"):
            raise ValueError(
                f"precision must be 'auto', 'bfloat16' or 'float32', got {self.precision!r}."
            )
        if self.slimming_lr <= 0:
            raise ValueError(f"slimming_lr must be positive, got {self.slimming_lr}.")
        if self.l1_weight < 0:
            raise ValueError(f"l1_weight must be >= 0, got {self.l1_weight}.")
        if self.pii_types is not None:
            object.__setattr__(self, "pii_types", type_tuple(self.pii_types, "pii_types"))
            unknown = [t for t in self.pii_types if t not in self.type_names]
            if unknown:
                raise ValueError(
                    f"pii_types {unknown} are not among type_names {list(self.type_names)}."
                )

    @classmethod
    def from_localization(cls, config: LocalizationConfig, **overrides: Any) -> BaselineConfig:
        """Baseline settings that match a localization run: its batches, types, objective
        and number of steps (for slimming)."""
        settings = dict(
            batch_size=config.batch_size,
            device=config.device,
            pii_types=config.pii_types,
            type_names=config.type_names,
            slimming_steps=config.steps,
            pii_loss=config.pii_loss,
            keep_loss=config.keep_loss,
            keep_weight=config.keep_weight,
            precision=config.precision,
        )
        settings.update(overrides)
        return cls(**settings)


class PassCounter:
    """Counts the model's forward and backward passes of one baseline run."""

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0


ScoreFn = Callable[[Any, list[Batch], BaselineConfig, int, int, PassCounter], Tensor]


def select(
    method: str,
    model: Any,
    batches: BatchSource,
    k: int,
    *,
    seed: int = 0,
    config: BaselineConfig | None = None,
    model_name: str | None = None,
    references: ReferenceCache | None = None,
) -> PrivacyNeurons:
    """Select exactly ``k`` neurons with a baseline ``method``.

    Args:
        method: one of ``BASELINE_METHODS``.
        model: a TransformerLens model (see :func:`tl_privacy.hooks.check_model`).
        batches: the batches ``localize`` takes (dicts with ``input_ids``,
            ``attention_mask``, ``pii_mask`` and optional ``pii_type_ids``).
        k: number of neurons to select.
        seed: seed of ``random`` (the other methods are deterministic on CPU).
        config: settings; defaults to :class:`BaselineConfig()`.
        model_name: stored with the set; defaults to ``model.cfg.model_name``.
        references: for ``slimming``, the unmasked model's keep-position predictions on
            ``batches``, shared with a localization run over the same batches (see
            :class:`tl_privacy.localization.ReferenceCache`); the other methods ignore it.

    Returns:
        The set, with the scores, the settings and ``stats`` holding ``wall_time_s``,
        ``forward_passes`` and ``backward_passes``. The model's parameters, their
        ``requires_grad`` and its train/eval mode are as before, and no hook stays attached.
    """
    config = config or BaselineConfig()
    scores, stats = score(
        method, model, batches, k=k, seed=seed, config=config, references=references
    )
    return PrivacyNeurons.from_scores(
        scores,
        k,
        method=method,
        model_name=model_name or getattr(model.cfg, "model_name", None),
        pii_types=config.pii_types or config.type_names,
        config={**asdict(config), "seed": seed},
        stats=stats,
        model_fingerprint=model_fingerprint(model),
    )


def score(
    method: str,
    model: Any,
    batches: BatchSource,
    *,
    k: int | None = None,
    seed: int = 0,
    config: BaselineConfig | None = None,
    references: ReferenceCache | None = None,
) -> tuple[Float[Tensor, "n_layers d_mlp"], dict[str, Any]]:
    """Score every neuron with ``method``; returns ``(scores, stats)``.

    ``k`` scales slimming's L1 penalty (default: 1% of the neurons) and ``references``
    holds its keep-position predictions (see :func:`slimming_scores`); the other methods
    ignore both.
    """
    if method not in SCORERS:
        raise ValueError(f"Unknown baseline method {method!r}; choose one of {BASELINE_METHODS}.")
    config = config or BaselineConfig()
    n_layers, d_mlp = check_model(model)
    n_neurons = n_layers * d_mlp
    if k is not None and not 0 <= k <= n_neurons:
        raise ValueError(f"k must be between 0 and {n_neurons} (all neurons), got {k}.")
    scale = k if k else max(1, n_neurons // 100)

    data: list[Batch] = []
    if method != "random":
        device = torch.device(config.device) if config.device else _device_of(model)
        data = as_batches(batches, config.batch_size, device, getattr(model.cfg, "d_vocab", None))
        data = restrict_to_types(data, config.pii_types, config.type_names)
        if not any(bool(shifted_targets(batch)[1].any()) for batch in data):
            raise ValueError(
                "No batch has a PII token"
                + (f" of types {list(config.pii_types)}" if config.pii_types else "")
                + f" to score neurons with; {method} needs at least one."
            )

    if method in ("integrated_gradients", "slimming") and not torch.is_grad_enabled():
        raise RuntimeError(
            f"{method} needs gradients, but gradients are off (torch.no_grad() or "
            "torch.inference_mode() is active). Call it outside that block."
        )
    passes = PassCounter()
    started = time.perf_counter()
    with autocast(model, config.precision):
        if method == "slimming":
            scores = slimming_scores(model, data, config, seed, scale, passes, references)
        else:
            scores = SCORERS[method](model, data, config, seed, scale, passes)
    stats = {
        "wall_time_s": time.perf_counter() - started,
        "forward_passes": passes.forward,
        "backward_passes": passes.backward,
    }
    logger.info(
        "baseline %s: %.1f s, %d forward and %d backward passes",
        method,
        stats["wall_time_s"],
        passes.forward,
        passes.backward,
    )
    return scores.detach().float().cpu(), stats


# ---- random ----


def random_scores(
    model: Any,
    data: list[Batch],
    config: BaselineConfig,
    seed: int,
    scale: int,
    passes: PassCounter,
) -> Tensor:
    """Uniform scores from ``torch.Generator().manual_seed(seed)``; no model pass."""
    n_layers, d_mlp = check_model(model)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n_layers, d_mlp), generator=generator)


# ---- activation difference ----


def activation_scores(
    model: Any,
    data: list[Batch],
    config: BaselineConfig,
    seed: int,
    scale: int,
    passes: PassCounter,
) -> Tensor:
    """Mean ``hook_post`` activation at PII positions minus the mean at other real positions."""
    n_layers, d_mlp = check_model(model)
    pii_sum = torch.zeros((n_layers, d_mlp), dtype=torch.float64)
    other_sum = torch.zeros((n_layers, d_mlp), dtype=torch.float64)
    counts = {"pii": 0, "other": 0}
    current: dict[str, Tensor] = {}

    def accumulate(layer: int):
        def add_activations(activation: Tensor, hook: Any) -> Tensor:
            acts = activation[:, :-1].double()
            pii_sum[layer] += acts[current["pii"]].sum(0).cpu()
            other_sum[layer] += acts[current["other"]].sum(0).cpu()
            return activation

        return add_activations

    hooks = [(mlp_post_name(layer), accumulate(layer)) for layer in range(n_layers)]
    with torch.no_grad(), weights_cast_once(model, config.precision), attached(model, hooks):
        for batch in _limit(data, config.max_batches):
            _, pii, other = shifted_targets(batch)
            current["pii"], current["other"] = pii, other
            counts["pii"] += int(pii.sum())
            counts["other"] += int(other.sum())
            model_logits(model, batch["input_ids"], batch["attention_mask"])
            passes.forward += 1

    if counts["other"] == 0:
        raise ValueError("activation needs non-PII tokens to compare with; the batches have none.")
    return (pii_sum / counts["pii"] - other_sum / counts["other"]).float()


# ---- integrated gradients ----


def integrated_gradients_scores(
    model: Any,
    data: list[Batch],
    config: BaselineConfig,
    seed: int,
    scale: int,
    passes: PassCounter,
) -> Tensor:
    """Integrated gradients of the PII log-probability on ``hook_post``, summed over PII positions.

    For activations ``a`` and the objective ``F`` (the summed log-probability of the PII
    tokens), the attribution is ``a * mean_k dF/dx (x = k/m * a)`` for ``k = 1..m`` (right
    Riemann sum, ``m = config.ig_steps``), from the baseline ``x = 0``. The scaled values
    replace the activations at ``hook_post``, so each layer's input to ``F`` is its clean
    activation times ``k/m`` whatever the layers below output.

    ``"joint"`` scales all layers together: ``F`` is a function of every layer's activations
    at once, which costs one forward and one backward pass per step and batch.
    ``"per_layer"`` scales one layer at a time with the others left clean, as DEPN does
    (n_layers times the passes). Each neuron's score is the sum of its attributions over
    PII positions, divided by their number.
    """
    n_layers, d_mlp = check_model(model)
    totals = torch.zeros((n_layers, d_mlp), dtype=torch.float64)
    n_positions = 0
    batches = _limit(data, config.max_batches)
    groups = (
        [list(range(n_layers))] if config.ig_mode == "joint" else [[L] for L in range(n_layers)]
    )
    progress = tqdm(
        total=len(batches) * len(groups) * config.ig_steps,
        desc="integrated gradients",
        disable=not config.show_progress,
    )

    with frozen(model), weights_cast_once(model, config.precision):
        for batch in batches:
            _, pii, _ = shifted_targets(batch)
            n_positions += int(pii.sum())
            clean = _clean_activations(model, batch, n_layers)
            passes.forward += 1
            for layers in groups:
                gradients = _riemann_gradients(model, batch, clean, layers, config.ig_steps, passes)
                for layer, gradient in gradients.items():
                    attribution = clean[layer][:, :-1] * gradient[:, :-1] / config.ig_steps
                    totals[layer] += attribution[pii].double().sum(0).cpu()
                progress.update(config.ig_steps)
    progress.close()
    return (totals / max(1, n_positions)).float()


def _clean_activations(model: Any, batch: Batch, n_layers: int) -> dict[int, Tensor]:
    activations: dict[int, Tensor] = {}

    def store(layer: int):
        def keep_activation(activation: Tensor, hook: Any) -> Tensor:
            activations[layer] = activation.detach().clone()
            return activation

        return keep_activation

    hooks = [(mlp_post_name(layer), store(layer)) for layer in range(n_layers)]
    with torch.no_grad(), attached(model, hooks):
        model_logits(model, batch["input_ids"], batch["attention_mask"])
    return activations


def _riemann_gradients(
    model: Any,
    batch: Batch,
    clean: dict[int, Tensor],
    layers: list[int],
    steps: int,
    passes: PassCounter,
) -> dict[int, Tensor]:
    """Sum over ``k = 1..steps`` of ``dF/dx`` at ``x = k/steps * clean`` for ``layers``."""
    sums = {layer: torch.zeros_like(clean[layer]) for layer in layers}
    scaled: dict[int, Tensor] = {}
    alpha = {"value": 0.0}

    def replace_with_scaled(layer: int):
        def scale(activation: Tensor, hook: Any) -> Tensor:
            leaf = (alpha["value"] * clean[layer]).requires_grad_(True)
            scaled[layer] = leaf
            return leaf

        return scale

    targets, pii, _ = shifted_targets(batch)
    hooks = [(mlp_post_name(layer), replace_with_scaled(layer)) for layer in layers]
    with attached(model, hooks):
        for step in range(1, steps + 1):
            alpha["value"] = step / steps
            (rows,) = predicting_logits(model, batch["input_ids"], batch["attention_mask"], [pii])
            objective = row_log_probs(rows, targets[pii]).sum()
            gradients = torch.autograd.grad(objective, [scaled[layer] for layer in layers])
            for layer, gradient in zip(layers, gradients, strict=True):
                sums[layer] += gradient
            passes.forward += 1
            passes.backward += 1
    return sums


# ---- slimming ----


def slimming_scores(
    model: Any,
    data: list[Batch],
    config: BaselineConfig,
    seed: int,
    scale: int,
    passes: PassCounter,
    references: ReferenceCache | None = None,
) -> Tensor:
    """Train a coefficient per neuron in [0, 1] against the PII; the score is ``1 - c``.

    The loss is ``pii_loss + keep_weight * keep_loss + l1_weight * sum(1 - c) / scale``:
    the localization objective with an L1 penalty in place of the hard-concrete L0 term.
    ``scale`` is the number of neurons to select. After each Adam step the coefficients are
    clipped back to [0, 1]. Ties among untouched neurons (``c = 1``) are broken by position.
    ``references`` holds the unmasked model's keep-position predictions, shared with a
    localization run over the same batches (see
    :class:`tl_privacy.localization.ReferenceCache`); None computes them anew.
    """
    n_layers, d_mlp = check_model(model)
    device = data[0]["input_ids"].device
    coefficients = torch.ones((n_layers, d_mlp), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=config.slimming_lr)
    bypass = {"on": False}

    def scale_neurons(layer: int):
        def multiply(activation: Tensor, hook: Any) -> Tensor:
            if bypass["on"]:
                return activation
            return activation * coefficients[layer].to(activation.dtype)

        return multiply

    cache = references if references is not None else ReferenceCache(float("inf"))
    precision = resolve_precision(model, config.precision)

    def reference(index: int, batch: Batch) -> Tensor | None:
        if config.keep_loss != "kl":
            return None

        def compute() -> Tensor:
            _, _, keep = shifted_targets(batch)
            bypass["on"] = True
            try:
                with torch.no_grad():
                    (rows,) = predicting_logits(
                        model, batch["input_ids"], batch["attention_mask"], [keep]
                    )
            finally:
                bypass["on"] = False
            passes.forward += 1
            return torch.log_softmax(rows.float(), dim=-1)

        return cache.get(index, batch, compute, model=model, precision=precision)

    hooks = [(mlp_post_name(layer), scale_neurons(layer)) for layer in range(n_layers)]
    progress = tqdm(range(config.slimming_steps), desc="slimming", disable=not config.show_progress)
    with frozen(model), weights_cast_once(model, config.precision), attached(model, hooks):
        for step in progress:
            index = step % len(data)
            batch = data[index]
            target = reference(index, batch)
            _, pii, keep = shifted_targets(batch)
            pii_rows, keep_rows = predicting_logits(
                model, batch["input_ids"], batch["attention_mask"], [pii, keep]
            )
            pii_term = pii_suppression_from_rows(pii_rows, batch, config.pii_loss)
            keep_term = keep_loss_from_rows(keep_rows, batch, config.keep_loss, target)
            l1_term = config.l1_weight * (1 - coefficients).sum() / scale
            check_finite(pii_term, "PII suppression")
            check_finite(keep_term, "keep")

            loss = pii_term + config.keep_weight * keep_term + l1_term
            optimizer.zero_grad(set_to_none=True)
            # Gradients of the coefficients only, because weights_cast_once makes the weights
            # require grad.
            loss.backward(inputs=[coefficients])
            optimizer.step()
            with torch.no_grad():
                coefficients.clamp_(0.0, 1.0)
            passes.forward += 1
            passes.backward += 1
            progress.set_postfix(pii=f"{pii_term.item():.3f}", keep=f"{keep_term.item():.4f}")
    return (1.0 - coefficients.detach()).cpu()


SCORERS: dict[str, ScoreFn] = {
    "random": random_scores,
    "activation": activation_scores,
    "integrated_gradients": integrated_gradients_scores,
    "slimming": slimming_scores,
}


def _limit(data: list[Batch], max_batches: int | None) -> list[Batch]:
    return data if max_batches is None else data[:max_batches]


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


__all__ = [
    "BASELINE_METHODS",
    "BaselineConfig",
    "PassCounter",
    "activation_scores",
    "integrated_gradients_scores",
    "random_scores",
    "score",
    "select",
    "slimming_scores",
]
