"""Hard-concrete gates on MLP neurons (Louizos, Welling and Kingma, 2018, "Learning Sparse
Neural Networks through L0 Regularization").

One gate per neuron of ``blocks.{L}.mlp.hook_post``. In training mode a gate is drawn as

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    gate = clamp(s * (zeta - gamma) + gamma, 0, 1)

with stretch limits ``gamma = -0.1``, ``zeta = 1.1`` and temperature ``beta``; the
stretch puts probability mass on exactly 0 (closed) and exactly 1 (open), and the
draw is differentiable in ``log_alpha``. In evaluation mode the gate is the
deterministic ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from tl_privacy.cache import follow_umask, read_config_json, read_safetensors, replaced_folder
from tl_privacy.hooks import FwdHooks, HookHandles, attach, attached, check_model, mlp_post_name

try:  # TransformerLens 4 moved HookedRootModule into its own module.
    from transformer_lens.HookedRootModule import HookedRootModule
except ImportError:  # TransformerLens 3
    from transformer_lens.hook_points import HookedRootModule

GAMMA = -0.1
"""Lower stretch limit of the hard-concrete distribution."""

ZETA = 1.1
"""Upper stretch limit of the hard-concrete distribution."""

UNIFORM_EPS = 1e-6
"""Uniform draws are clamped to [eps, 1 - eps] so that log u and log(1 - u) stay finite."""

MASK_CONFIG_FILE = "config.json"
MASK_TENSORS_FILE = "mask.safetensors"
MASK_FORMAT_VERSION = 1
_MASK_CONFIG_KEYS = ("format_version", "n_layers", "d_mlp", "temperature", "init_open_prob", "seed")


def log_alpha_for_open_prob(open_prob: float, temperature: float) -> float:
    """Return the ``log_alpha`` at which a gate is non-zero with probability ``open_prob``.

    Solves ``1 - P(gate = 0) = open_prob`` for the closed form of ``P(gate = 0)``
    (see :meth:`HardConcreteMask.prob_closed`).
    """
    if not 0.0 < open_prob < 1.0:
        raise ValueError(f"init_open_prob must be in (0, 1), got {open_prob!r}.")
    return temperature * math.log(-GAMMA / ZETA) + math.log(open_prob / (1.0 - open_prob))


class _GateLayer(nn.Module):
    """Holds one layer's hook point, so gates are cached as ``layers.{L}.hook_gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_gate = HookPoint()


class HardConcreteMask(HookedRootModule):
    """Learnable hard-concrete gates, one per MLP neuron of every layer.

    The mask is itself a ``HookedRootModule``: every gate vector passes through the
    hook point ``layers.{L}.hook_gate`` (shape ``[d_mlp]``), so gates can be cached
    with ``mask.run_with_cache()`` and edited with hooks like any model activation.

    Args:
        n_layers: number of transformer blocks.
        d_mlp: number of MLP neurons per block.
        temperature: hard-concrete temperature ``beta`` (> 0); lower is closer to binary.
        init_open_prob: probability that a gate is non-zero at initialisation, the
            same in every layer (0.99 gives ``log_alpha`` of about 3.0 at ``beta = 2/3``).
        seed: seed of the generator that draws the uniform noise, or None to use
            torch's global generator.
    """

    def __init__(
        self,
        n_layers: int,
        d_mlp: int,
        *,
        temperature: float = 2.0 / 3.0,
        init_open_prob: float = 0.99,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if n_layers <= 0 or d_mlp <= 0:
            raise ValueError(f"n_layers and d_mlp must be positive, got {n_layers} and {d_mlp}.")
        if not temperature > 0:
            raise ValueError(
                f"temperature must be > 0, got {temperature!r}; the usual value is 2/3."
            )

        self.n_layers = n_layers
        self.d_mlp = d_mlp
        self.temperature = float(temperature)
        self.init_open_prob = float(init_open_prob)
        self.seed = seed

        init = log_alpha_for_open_prob(init_open_prob, self.temperature)
        self.log_alpha = nn.Parameter(torch.full((n_layers, d_mlp), init))
        self.layers = nn.ModuleList(_GateLayer() for _ in range(n_layers))
        self._generator: torch.Generator | None = None
        self._handles: HookHandles | None = None
        self.bypass = False
        self.setup()

    @classmethod
    def for_model(cls, model: Any, **kwargs: Any) -> HardConcreteMask:
        """Build a mask shaped for ``model``, on the device of its parameters."""
        n_layers, d_mlp = check_model(model)
        mask = cls(n_layers, d_mlp, **kwargs)
        device = _model_device(model)
        return mask.to(device) if device is not None else mask

    # ---- saving ----

    def save(self, path: str | os.PathLike) -> Path:
        """Write the gates to the folder ``path``: ``log_alpha`` in ``mask.safetensors`` and
        the shape, temperature, initial open probability and seed in ``config.json``.

        The folder may be new, empty, or an earlier saved mask, which is replaced whole. It is
        written next to its final place and renamed into it, so a failure leaves no
        half-written mask behind.

        Raises:
            FileExistsError: when ``path`` is a file, or a folder that contains other files.
        """
        target = Path(path)
        with replaced_folder(target, (MASK_CONFIG_FILE, MASK_TENSORS_FILE), "mask") as staging:
            tensors = {"log_alpha": self.log_alpha.detach().float().cpu().contiguous()}
            save_file(tensors, str(staging / MASK_TENSORS_FILE))
            follow_umask(staging / MASK_TENSORS_FILE)
            config = {
                "format_version": MASK_FORMAT_VERSION,
                "n_layers": self.n_layers,
                "d_mlp": self.d_mlp,
                "temperature": self.temperature,
                "init_open_prob": self.init_open_prob,
                "seed": self.seed,
            }
            (staging / MASK_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> HardConcreteMask:
        """Read a mask written by :meth:`save`, in training mode and on the CPU.

        Raises:
            FileNotFoundError: when a file of the mask is missing.
            ValueError: when a file is damaged or of another format version.
        """
        folder = Path(path)
        config_path, tensors_path = folder / MASK_CONFIG_FILE, folder / MASK_TENSORS_FILE
        if not config_path.is_file() or not tensors_path.is_file():
            raise FileNotFoundError(
                f"{folder} is not a saved mask: it needs {MASK_CONFIG_FILE} and "
                f"{MASK_TENSORS_FILE} (written by HardConcreteMask.save)."
            )
        config = read_config_json(config_path)
        tensors = read_safetensors(tensors_path)
        missing = [key for key in _MASK_CONFIG_KEYS if key not in config]
        missing += [] if "log_alpha" in tensors else ["the log_alpha tensor"]
        if missing:
            raise ValueError(f"{folder} contains a damaged mask: {', '.join(missing)} missing.")
        if config["format_version"] != MASK_FORMAT_VERSION:
            raise ValueError(
                f"{config_path} has format_version {config['format_version']!r}; this "
                f"tl_privacy reads version {MASK_FORMAT_VERSION}."
            )

        log_alpha = tensors["log_alpha"]
        mask = cls(
            config["n_layers"],
            config["d_mlp"],
            temperature=config["temperature"],
            init_open_prob=config["init_open_prob"],
            seed=config["seed"],
        )
        if tuple(log_alpha.shape) != (mask.n_layers, mask.d_mlp):
            raise ValueError(
                f"{tensors_path} contains log_alpha of shape {tuple(log_alpha.shape)} but "
                f"{config_path} says {(mask.n_layers, mask.d_mlp)}; the folder is damaged."
            )
        with torch.no_grad():
            mask.log_alpha.copy_(log_alpha)
        return mask

    # ---- gate values ----

    def _uniform(self, shape: torch.Size) -> Tensor:
        device = self.log_alpha.device
        if self.seed is None:
            return torch.rand(shape, device=device)
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return torch.rand(shape, device=device, generator=self._generator)

    def gates_from_uniform(self, u: Tensor, layer: int | None = None) -> Tensor:
        """Compute stochastic gates from given uniform draws.

        Args:
            u: uniform draws shaped like ``log_alpha`` (or like one layer of it when
                ``layer`` is given). Values of exactly 0 or 1 are clamped to
                ``[1e-6, 1 - 1e-6]``, so every gate is finite.
            layer: a single layer, or None for all layers.

        Returns:
            Gates in [0, 1], shaped like ``u``.
        """
        log_alpha = self.log_alpha if layer is None else self.log_alpha[layer]
        u = u.clamp(UNIFORM_EPS, 1.0 - UNIFORM_EPS)
        noise = torch.log(u) - torch.log1p(-u)
        s = torch.sigmoid((noise + log_alpha) / self.temperature)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def deterministic_gates(self) -> Float[Tensor, "n_layers d_mlp"]:
        """Gates used at evaluation:
        ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``."""
        return _deterministic(self.log_alpha)

    def gate(self, layer: int) -> Float[Tensor, d_mlp]:
        """Return layer ``layer``'s gates: a fresh draw in training mode, deterministic in eval."""
        log_alpha = self.log_alpha[layer]
        if self.training:
            value = self.gates_from_uniform(self._uniform(log_alpha.shape), layer)
        else:
            value = _deterministic(log_alpha)
        return self.layers[layer].hook_gate(value)

    def forward(self) -> Float[Tensor, "n_layers d_mlp"]:
        """Return the gates of every layer (drawn in training mode), through the hook points."""
        return torch.stack([self.gate(layer) for layer in range(self.n_layers)])

    # ---- closed forms ----

    def prob_closed(self) -> Float[Tensor, "n_layers d_mlp"]:
        """Probability that a drawn gate is exactly 0.

        ``P(gate = 0) = sigmoid(beta * log(-gamma / zeta) - log_alpha)``.
        """
        return torch.sigmoid(self.temperature * math.log(-GAMMA / ZETA) - self.log_alpha)

    def prob_open(self) -> Float[Tensor, "n_layers d_mlp"]:
        """Probability that a drawn gate is exactly 1.

        ``P(gate = 1) = sigmoid(log_alpha - beta * log((1 - gamma) / (zeta - 1)))``.
        """
        return torch.sigmoid(
            self.log_alpha - self.temperature * math.log((1.0 - GAMMA) / (ZETA - 1.0))
        )

    def expected_closed(self) -> Float[Tensor, ""]:
        """Expected number of closed gates, differentiable in ``log_alpha`` (the L0 term)."""
        return self.prob_closed().sum()

    def closed(self) -> torch.Tensor:
        """Boolean ``[n_layers, d_mlp]``: gates more likely closed than not, ``P(gate = 0) > 0.5``.

        This is the count that the L0 term ``expected_closed`` estimates; it holds when
        ``log_alpha < beta * log(-gamma / zeta)`` (about -1.6 at ``beta = 2/3``), where
        the deterministic gate is below about 0.10.
        """
        return self.prob_closed() > 0.5

    # ---- hooks ----

    def _hook_fn(self, layer: int):
        def scale_by_gate(activation: Tensor, hook: Any) -> Tensor:
            if self.bypass:
                return activation
            if activation.shape[-1] != self.d_mlp:
                raise ValueError(
                    f"this mask has d_mlp={self.d_mlp}, but the activation at {hook.name} has "
                    f"shape {tuple(activation.shape)}; build the mask with "
                    "HardConcreteMask.for_model(model)."
                )
            # The layer comes from the closure: on a TL 4 bridge the hook point of
            # hook_post is named blocks.{L}.mlp.out.hook_in, not hook_post.
            gate = self.gate(layer).to(device=activation.device, dtype=activation.dtype)
            return activation * gate

        scale_by_gate.__name__ = f"hard_concrete_gate_layer_{layer}"
        return scale_by_gate

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """Let attached gate hooks pass activations through unchanged inside the block."""
        previous, self.bypass = self.bypass, True
        try:
            yield
        finally:
            self.bypass = previous

    def fwd_hooks(self) -> FwdHooks:
        """Hooks that multiply each layer's ``hook_post`` by its gates, for ``run_with_hooks``."""
        return [(mlp_post_name(layer), self._hook_fn(layer)) for layer in range(self.n_layers)]

    def _check_shape(self, model: Any) -> None:
        n_layers, d_mlp = check_model(model)
        if (n_layers, d_mlp) != (self.n_layers, self.d_mlp):
            raise ValueError(
                f"This mask has shape [n_layers={self.n_layers}, d_mlp={self.d_mlp}] but the model "
                f"has [n_layers={n_layers}, d_mlp={d_mlp}]; build the mask with "
                "HardConcreteMask.for_model(model)."
            )

    @contextmanager
    def applied(self, model: Any) -> Iterator[Any]:
        """Attach the gates to ``model`` for the body of a ``with`` block; always detached after."""
        self._check_shape(model)
        with attached(model, self.fwd_hooks()):
            yield model

    def attach(self, model: Any) -> None:
        """Attach the gates persistently; :meth:`detach` removes exactly these hooks.

        Attaching again after ``model.reset_hooks()`` removed the gates works as the first
        time.
        """
        self._check_shape(model)
        if self._handles is not None and self._handles.attached():
            raise RuntimeError("This mask is already attached; call detach() first.")
        self.detach()
        self._handles = attach(model, self.fwd_hooks())

    def detach(self) -> None:
        """Remove the hooks added by :meth:`attach`; does nothing when not attached."""
        if self._handles is not None:
            self._handles.remove()
            self._handles = None


def _deterministic(log_alpha: Tensor) -> Tensor:
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _model_device(model: Any) -> torch.device | None:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return None
