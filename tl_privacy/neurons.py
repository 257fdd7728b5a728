"""A set of MLP neurons, how to ablate it, and how to store it.

``PrivacyNeurons`` is what every localization method returns, the learned masks
and the baselines alike, so ablation, evaluation and reports treat them the same.
It is stored as a folder with ``neurons.safetensors`` (tensors) and
``config.json`` (shape, hook, method, settings and the weights fingerprint of the model it
was localized on); no pickle is involved.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from safetensors.torch import save_file
from torch import Tensor

from tl_privacy.cache import follow_umask, read_config_json, read_safetensors, replaced_folder
from tl_privacy.hooks import (
    MLP_POST,
    FwdHooks,
    HookHandles,
    attach,
    attached,
    check_model,
)

logger = logging.getLogger("tl_privacy")

# Sets saved without "model_fingerprint" in config.json are still version 1 and load with
# model_fingerprint=None.
FORMAT_VERSION = 1
# Hex digits of a fingerprint shown in messages. Fewer than 10, because the log redactor
# reads a run of 10 or more digits as a phone number and would hide the fingerprint.
FINGERPRINT_DIGITS = 8
TENSORS_FILE = "neurons.safetensors"
CONFIG_FILE = "config.json"


class IncompatibleNeuronsError(ValueError):
    """Raised when a neuron set is used with a model of another shape."""


@dataclass
class PrivacyNeurons:
    """A set of MLP neurons, as a boolean ``[n_layers, d_mlp]`` mask over ``hook_post``.

    Attributes:
        mask: True at the selected neurons.
        scores: the method's score per neuron (higher means more tied to the PII),
            from which the set was taken; None when the method has none.
        gates: deterministic gate values of the learned mask, or None for other methods.
        method: name of the method that chose the set (``"hard_concrete"``, ``"random"``, ...).
        model_name: name of the model the set was found on.
        pii_types: the PII types the localization targeted.
        config: the method's settings, stored with the set.
        stats: wall time, model passes and other measurements of the run.
        hook_name: the hook point the mask applies to, with ``{layer}`` for the layer index.
        model_fingerprint: ``tl_privacy.models.model_fingerprint`` of the weights the set was
            found on, or None when unknown (sets saved before the field existed and sets
            built by hand).
    """

    mask: Bool[Tensor, "n_layers d_mlp"]
    scores: Float[Tensor, "n_layers d_mlp"] | None = None
    gates: Float[Tensor, "n_layers d_mlp"] | None = None
    method: str = "hard_concrete"
    model_name: str | None = None
    pii_types: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    hook_name: str = MLP_POST
    # Last, so that positional construction from before the field existed still works.
    model_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.mask.dim() != 2:
            raise ValueError(f"mask must be [n_layers, d_mlp], got shape {tuple(self.mask.shape)}.")
        self.mask = self.mask.detach().to("cpu", torch.bool)
        for name in ("scores", "gates"):
            value = getattr(self, name)
            if value is None:
                continue
            if value.shape != self.mask.shape:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)} but mask has {tuple(self.mask.shape)}."
                )
            setattr(self, name, value.detach().to("cpu", torch.float32))
        self.pii_types = tuple(self.pii_types)
        if "{layer}" not in self.hook_name:
            raise ValueError(
                f"hook_name must contain '{{layer}}' for the layer index, got {self.hook_name!r}."
            )

    # ---- construction ----

    @classmethod
    def from_scores(
        cls,
        scores: Float[Tensor, "n_layers d_mlp"],
        k: int,
        method: str,
        **kwargs: Any,
    ) -> PrivacyNeurons:
        """Select the ``k`` neurons with the highest scores (ties broken by position).

        Raises:
            ValueError: if ``k`` is negative or larger than the number of neurons.
        """
        total = scores.numel()
        if not 0 <= k <= total:
            raise ValueError(f"k must be between 0 and {total} (all neurons), got {k}.")
        flat = scores.detach().float().flatten().cpu()
        if torch.isnan(flat).any():
            raise ValueError(f"scores for method {method!r} contain NaN; cannot rank neurons.")

        # A stable sort keeps equal scores in index order, so the choice is reproducible.
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        mask = torch.zeros(total, dtype=torch.bool)
        mask[order] = True
        return cls(mask=mask.view_as(scores), scores=scores, method=method, **kwargs)

    def top_k(self, k: int) -> PrivacyNeurons:
        """Re-select ``k`` neurons from this set's scores, keeping its other fields."""
        if self.scores is None:
            raise ValueError(f"The {self.method!r} set has no scores to rank; top_k needs them.")
        selected = PrivacyNeurons.from_scores(self.scores, k, self.method)
        return self._replace_mask(selected.mask)

    def _replace_mask(self, mask: Tensor) -> PrivacyNeurons:
        return PrivacyNeurons(
            mask=mask,
            scores=self.scores,
            gates=self.gates,
            method=self.method,
            model_name=self.model_name,
            model_fingerprint=self.model_fingerprint,
            pii_types=self.pii_types,
            config=dict(self.config),
            stats=dict(self.stats),
            hook_name=self.hook_name,
        )

    # ---- shape and counts ----

    @property
    def n_layers(self) -> int:
        return int(self.mask.shape[0])

    @property
    def d_mlp(self) -> int:
        return int(self.mask.shape[1])

    @property
    def count(self) -> int:
        """Number of selected neurons."""
        return int(self.mask.sum())

    @property
    def fraction(self) -> float:
        """Selected neurons as a fraction of all MLP neurons."""
        return self.count / self.mask.numel()

    def by_layer(self) -> list[int]:
        """Number of selected neurons in each layer."""
        return [int(n) for n in self.mask.sum(dim=1)]

    def indices(self) -> list[tuple[int, int]]:
        """The selected neurons as ``(layer, neuron)`` pairs, in layer order."""
        return [(int(layer), int(neuron)) for layer, neuron in self.mask.nonzero().tolist()]

    def jaccard(self, other: PrivacyNeurons) -> float:
        """Jaccard overlap |A ∩ B| / |A ∪ B| of two sets (1.0 when both are empty)."""
        if other.mask.shape != self.mask.shape:
            raise IncompatibleNeuronsError(
                f"Cannot compare sets of shapes {tuple(self.mask.shape)} and "
                f"{tuple(other.mask.shape)}."
            )
        union = int((self.mask | other.mask).sum())
        if union == 0:
            return 1.0
        return int((self.mask & other.mask).sum()) / union

    def check_compatible(self, model: Any) -> None:
        """Raise ``IncompatibleNeuronsError`` unless ``model`` has this set's shape."""
        n_layers, d_mlp = check_model(model)
        if (n_layers, d_mlp) != (self.n_layers, self.d_mlp):
            raise IncompatibleNeuronsError(
                f"This neuron set was found on a model with n_layers={self.n_layers}, "
                f"d_mlp={self.d_mlp} (model {self.model_name!r}), but the given model has "
                f"n_layers={n_layers}, d_mlp={d_mlp}. Use the set with the model it was "
                "localized on."
            )

    def warn_if_other_weights(
        self,
        model: Any,
        model_name: str | None = None,
        source: str | os.PathLike | None = None,
    ) -> bool:
        """Log a warning when ``model``'s weights differ from those the set was localized on.

        A different fingerprint is not an error: evaluating a set found on a fine-tuned
        checkpoint on its base model is a legitimate experiment. A set without a stored
        fingerprint is not checked, and an info line is logged. Hashing reads every parameter
        of ``model`` once (see ``tl_privacy.models.model_fingerprint``).

        Args:
            model: the model the set is about to be used with.
            model_name: its name for the message; defaults to ``tl_privacy.models.model_id``.
            source: where the set was loaded from, for the message.

        Returns:
            True when the fingerprints differ and the warning was logged.
        """
        from tl_privacy.models import model_fingerprint, model_id

        where = "this neuron set" if source is None else f"the neuron set {str(source)!r}"
        if self.model_fingerprint is None:
            logger.info(
                "%s stores no model fingerprint, so it is not checked against the weights of "
                "the model",
                where,
            )
            return False

        fingerprint = model_fingerprint(model)
        if fingerprint == self.model_fingerprint:
            return False
        name = model_name if model_name is not None else model_id(model)
        logger.warning(
            "%s was localized on other weights: model %r (fingerprint %s) when it was found, "
            "model %r (fingerprint %s) now. Its neurons may not hold this model's PII; use the "
            "model it was localized on unless you mean to compare two checkpoints",
            where,
            self.model_name,
            self.model_fingerprint[:FINGERPRINT_DIGITS],
            name,
            fingerprint[:FINGERPRINT_DIGITS],
        )
        return True

    # ---- ablation ----

    def ablation_hooks(
        self,
        mode: Literal["zero", "mean"] = "zero",
        means: Float[Tensor, "n_layers d_mlp"] | None = None,
    ) -> FwdHooks:
        """Forward hooks that deactivate the selected neurons at ``hook_name`` of each layer
        (``blocks.{layer}.mlp.hook_post`` unless the set names another hook point).

        Args:
            mode: ``"zero"`` sets the neurons' activations to 0; ``"mean"`` sets them
                to ``means`` (for example their mean activation over a corpus).
            means: required for ``"mean"``.

        Returns:
            ``(hook name, hook function)`` pairs for ``run_with_hooks`` or
            ``model.hooks()``; layers without selected neurons get no hook.
        """
        if mode not in ("zero", "mean"):
            raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}.")
        if mode == "zero" and means is not None:
            raise ValueError("means are used only with mode='mean'; pass mode='mean' or no means.")
        if mode == "mean":
            if means is None:
                raise ValueError("mode='mean' needs means of shape [n_layers, d_mlp].")
            if tuple(means.shape) != tuple(self.mask.shape):
                raise ValueError(
                    f"means has shape {tuple(means.shape)}, expected {tuple(self.mask.shape)}."
                )

        hooks: FwdHooks = []
        for layer in range(self.n_layers):
            selected = self.mask[layer]
            if not selected.any():
                continue
            layer_means = None if means is None else means[layer].detach()
            name = self.hook_name.format(layer=layer)
            hooks.append((name, _ablation_hook(layer, selected, layer_means)))
        return hooks

    @contextmanager
    def ablated(
        self,
        model: Any,
        mode: Literal["zero", "mean"] = "zero",
        means: Float[Tensor, "n_layers d_mlp"] | None = None,
    ) -> Iterator[Any]:
        """Ablate the neurons of ``model`` inside a ``with`` block; the hooks are always removed."""
        self.check_compatible(model)
        with attached(model, self.ablation_hooks(mode, means)):
            yield model

    def attach(self, model: Any, mode: Literal["zero", "mean"] = "zero", means=None) -> HookHandles:
        """Ablate persistently; call ``.remove()`` on the returned handles to undo it."""
        self.check_compatible(model)
        return attach(model, self.ablation_hooks(mode, means))

    # ---- storage ----

    def save(self, path: str | os.PathLike) -> Path:
        """Write the set to the folder ``path``: a new folder, an empty one, or one that contains
        an earlier saved set, which is replaced whole.

        The folder is written next to its final place and renamed into it, so a
        failure leaves no half-written set behind.

        Raises:
            FileExistsError: when ``path`` is a file, or a folder that contains anything other
                than a saved set; nothing is written then.
        """
        target = Path(path)
        with replaced_folder(target, (CONFIG_FILE, TENSORS_FILE), "neuron set") as staging:
            tensors = {"mask": self.mask.to(torch.uint8).contiguous()}
            if self.scores is not None:
                tensors["scores"] = self.scores.contiguous()
            if self.gates is not None:
                tensors["gates"] = self.gates.contiguous()
            save_file(tensors, str(staging / TENSORS_FILE))
            follow_umask(staging / TENSORS_FILE)
            (staging / CONFIG_FILE).write_text(json.dumps(self._config_json(), indent=2))
        return target

    def _config_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "model_fingerprint": self.model_fingerprint,
            "n_layers": self.n_layers,
            "d_mlp": self.d_mlp,
            "hook_name": self.hook_name,
            "method": self.method,
            "pii_types": list(self.pii_types),
            "count": self.count,
            "by_layer": self.by_layer(),
            "config": _jsonable(self.config),
            "stats": _jsonable(self.stats),
        }

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None) -> PrivacyNeurons:
        """Read a set written by :meth:`save`; with ``model``, also check its shape."""
        folder = Path(path)
        config_path, tensors_path = folder / CONFIG_FILE, folder / TENSORS_FILE
        if not config_path.is_file() or not tensors_path.is_file():
            raise FileNotFoundError(
                f"{folder} is not a saved neuron set: it needs {CONFIG_FILE} and {TENSORS_FILE} "
                "(written by PrivacyNeurons.save or `tl-privacy localize`)."
            )
        meta = read_config_json(config_path)
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{config_path} has format_version {version!r}; this tl_privacy reads version "
                f"{FORMAT_VERSION}."
            )
        missing = [key for key in ("n_layers", "d_mlp", "method") if key not in meta]
        if missing:
            raise ValueError(f"{config_path} lacks {', '.join(missing)}; the folder is damaged.")

        tensors = read_safetensors(tensors_path)
        if "mask" not in tensors:
            raise ValueError(f"{tensors_path} contains no 'mask' tensor; the folder is damaged.")
        mask = tensors["mask"].bool()
        expected = (meta["n_layers"], meta["d_mlp"])
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"{tensors_path} contains a mask of shape {tuple(mask.shape)} but {config_path} "
                f"says {expected}; the folder is damaged."
            )
        neurons = cls(
            mask=mask,
            scores=tensors.get("scores"),
            gates=tensors.get("gates"),
            method=meta["method"],
            model_name=meta.get("model_name"),
            model_fingerprint=meta.get("model_fingerprint"),
            pii_types=tuple(meta.get("pii_types", ())),
            config=meta.get("config", {}),
            stats=meta.get("stats", {}),
            hook_name=meta.get("hook_name", MLP_POST),
        )
        if model is not None:
            neurons.check_compatible(model)
        return neurons

    # ---- notebook helpers ----

    def show(self, model: Any, text: Any, *, tokenizer: Any = None, **kwargs: Any) -> Any:
        """Render the set's ``hook_post`` activations on ``text`` as an offline circuitsvis view.

        ``text`` is a string, a ``PIIRecord`` or a list of them. The tokenizer defaults to
        ``model.tokenizer``. Other keyword arguments (``max_neurons``, ``redact``) go to
        :func:`tl_privacy.visualize.neuron_activation_view`, whose HTML object Jupyter displays.
        """
        # Imported here because tl_privacy.visualize imports this module.
        from tl_privacy.visualize import neuron_activation_view

        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"{type(model).__name__} has no tokenizer; pass tokenizer= to show().")
        return neuron_activation_view(model, tokenizer, text, self, **kwargs)

    def to_dataframe(self):
        """One row per selected neuron: layer, neuron, score, gate value and PII types."""
        import pandas as pd

        rows = []
        for layer, neuron in self.indices():
            rows.append(
                {
                    "layer": layer,
                    "neuron": neuron,
                    "score": None if self.scores is None else float(self.scores[layer, neuron]),
                    "gate": None if self.gates is None else float(self.gates[layer, neuron]),
                    "pii_types": ",".join(self.pii_types),
                }
            )
        return pd.DataFrame(rows, columns=["layer", "neuron", "score", "gate", "pii_types"])

    def __repr__(self) -> str:
        return (
            f"PrivacyNeurons(method={self.method!r}, count={self.count}, "
            f"fraction={self.fraction:.4%}, shape=[{self.n_layers}, {self.d_mlp}], "
            f"pii_types={list(self.pii_types)})"
        )


def _ablation_hook(layer: int, selected: Tensor, means: Tensor | None):
    cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor | None]] = {}

    def ablate_neurons(activation: Tensor, hook: Any) -> Tensor:
        key = (activation.device, activation.dtype)
        if key not in cache:
            if activation.shape[-1] != selected.numel():
                raise ValueError(
                    f"the neuron set has {selected.numel()} neurons per layer, but the "
                    f"activation at {getattr(hook, 'name', None) or 'this hook'} has shape "
                    f"{tuple(activation.shape)}; use a set found on this model."
                )
            keep = (~selected).to(device=activation.device, dtype=activation.dtype)
            fill = None
            if means is not None:
                fill = (means * selected).to(device=activation.device, dtype=activation.dtype)
            cache[key] = (keep, fill)
        keep, fill = cache[key]
        # Multiplying (rather than indexing in place) leaves the incoming tensor untouched.
        ablated = activation * keep
        return ablated if fill is None else ablated + fill

    ablate_neurons.__name__ = f"ablate_neurons_layer_{layer}"
    return ablate_neurons


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def union(sets: Sequence[PrivacyNeurons], method: str = "union") -> PrivacyNeurons:
    """Combine several sets of the same shape into their union.

    The union keeps the model fingerprint only when every set has the same one.
    """
    if not sets:
        raise ValueError("union needs at least one neuron set.")
    mask = sets[0].mask.clone()
    for other in sets[1:]:
        if other.mask.shape != mask.shape:
            raise IncompatibleNeuronsError("union needs sets of the same shape.")
        mask |= other.mask
    types = tuple(dict.fromkeys(t for s in sets for t in s.pii_types))
    fingerprints = {s.model_fingerprint for s in sets}
    return PrivacyNeurons(
        mask=mask,
        method=method,
        model_name=sets[0].model_name,
        model_fingerprint=fingerprints.pop() if len(fingerprints) == 1 else None,
        pii_types=types,
    )
