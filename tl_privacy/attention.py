"""Fused attention for evaluation passes that read no attention activations.

``TransformerBridge`` recomputes attention step by step so that its attention hook points
(``hook_attn_scores``, ``hook_pattern``, the rotary hooks) fire: every layer writes the
scores, a float32 copy of them for the softmax, and the pattern, for every head and query.
Behind a KV cache with many columns, as in exposure's candidate tries, this costs more than
the layer's matrix products. Inside :func:`fused_attention` each attention layer runs its
Hugging Face module instead, with PyTorch's ``scaled_dot_product_attention``, and those hook
points do not fire. On the demo's SmolLM2 (bfloat16, 2 CPU threads) this cut the evaluation
of the learned 1% set from 55.0 s to 45.7 s, measured back to back with
``EvaluationConfig(fused_attention=False)``. Models with grouped-query attention hand the
grouping to the kernel (:func:`_grouped_sdpa`) instead of copying keys and values per
query head.
"""

from __future__ import annotations

import logging
import re
import types
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from tl_privacy.hooks import has_module_hooks

logger = logging.getLogger("tl_privacy")

# Whether fused attention reproduces a model's logits, per model. The keys are weak
# references, so models can be freed.
_MATCHES: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()

# The switch of each model that is inside a fused_attention block. The keys are weak
# references, so models can be freed.
_SWITCHES: weakref.WeakKeyDictionary[Any, _Switch] = weakref.WeakKeyDictionary()

# Names of the hooks that fused attention leaves unchanged: those inside the MLP layers.
_SAFE_HOOK = re.compile(r"^blocks\.\d+\.mlp\.")


@dataclass
class _Switch:
    """The changes fused attention made to one model, kept to undo them.

    ``depth`` counts the open blocks that use the switch; the last one to close undoes it.
    ``paused`` counts the open nested blocks that run with the bridge's attention.
    """

    layers: list[torch.nn.Module]
    configs: list[Any]
    previous: list[str]
    own_forwards: list[Any]
    depth: int = 1
    paused: int = 0

    def apply(self) -> None:
        for layer in self.layers:
            # The base class's forward hands the inputs to the wrapped module. Written into
            # the instance's __dict__, because the bridge's __setattr__ would pass a
            # ``forward`` on to the wrapped module.
            layer.__dict__["forward"] = types.MethodType(_bridge_class().forward, layer)
        implementation = _attention_function()
        for config in self.configs:
            config._attn_implementation = implementation

    def undo(self) -> None:
        for config, previous in zip(self.configs, self.previous, strict=True):
            config._attn_implementation = previous
        for layer, own in zip(self.layers, self.own_forwards, strict=True):
            if own is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.__dict__["forward"] = own


def is_fused(model: Any) -> bool:
    """Return whether ``model``'s passes run with fused attention at this moment."""
    switch = _SWITCHES.get(model)
    return switch is not None and switch.paused == 0


@contextmanager
def fused_attention(model: Any, hook_names: Sequence[str] = ()) -> Iterator[bool]:
    """Run the block's forward passes with PyTorch's fused attention where nothing else changes.

    Yields whether fused attention is on. It stays off, and the block runs as it would
    without it, when any of these holds:

    - ``model`` is not a ``TransformerBridge`` over a Hugging Face model whose attention
      layers can switch their implementation;
    - gradients are enabled (on the CPU its backward pass was slower than the bridge's);
    - a hook is attached inside an attention layer, or ``hook_names`` (hooks the block will
      attach) has a name outside ``blocks.{L}.mlp``;
    - the first check on this model found other logits with it: in the model's own dtype
      without autocast, on a batch with a right-padded and a left-padded row, the largest
      difference must stay within 1e-4 of the largest logit. A model with bfloat16 weights
      fails it. The result is kept for the model's lifetime.

    The checks run on entry, so a hook attached inside the block after fused attention
    switched on does not receive the attention activations: name such hooks in ``hook_names``.
    A nested block whose checks fail runs with the bridge's attention until it closes.

    NOTE: the switch changes the model object itself, so while a block is open, passes of
    the same model on other threads run with fused attention too.

    Args:
        model: the model whose passes run inside the block.
        hook_names: names of the hooks that the block attaches after entering.
    """
    layers = _attention_layers(model)
    usable = (
        layers is not None
        and not torch.is_grad_enabled()
        and all(isinstance(name, str) and _SAFE_HOOK.match(name) for name in hook_names)
        and not any(has_module_hooks(layer) for layer in layers)
    )
    switch = _SWITCHES.get(model)
    if switch is not None:
        with _nested(model, switch, usable) as fused:
            yield fused
        return
    if not (usable and _logits_match(model, layers)):
        yield False
        return
    switch = _switch_on(model, layers)
    try:
        yield True
    finally:
        _release(model, switch)


@contextmanager
def _nested(model: Any, switch: _Switch, usable: bool) -> Iterator[bool]:
    """Open a block inside another block on the same model: fused if ``usable`` and the outer
    block is fused, else with the bridge's attention until it closes."""
    if usable and switch.paused == 0:
        switch.depth += 1
        try:
            yield True
        finally:
            _release(model, switch)
        return
    if switch.paused == 0:
        switch.undo()
    switch.paused += 1
    try:
        yield False
    finally:
        switch.paused -= 1
        if switch.paused == 0:
            switch.apply()


def _switch_on(model: Any, layers: list[torch.nn.Module]) -> _Switch:
    """Make every attention bridge call its Hugging Face module with SDPA."""
    configs = {id(model.original_model.config): model.original_model.config}
    for layer in layers:
        config = getattr(layer.original_component, "config", None)
        if config is not None:
            configs[id(config)] = config
    switch = _Switch(
        layers=layers,
        configs=list(configs.values()),
        previous=[config._attn_implementation for config in configs.values()],
        own_forwards=[layer.__dict__.get("forward") for layer in layers],
    )
    try:
        switch.apply()
    except BaseException:
        switch.undo()
        raise
    _SWITCHES[model] = switch
    return switch


def _release(model: Any, switch: _Switch) -> None:
    """Close one block of ``switch``; the last one undoes the switch."""
    switch.depth -= 1
    if switch.depth == 0:
        switch.undo()
        if _SWITCHES.get(model) is switch:
            del _SWITCHES[model]


def _bridge_class() -> type | None:
    """Return TransformerLens 4's ``AttentionBridge``, or None under TransformerLens 3."""
    try:
        from transformer_lens.model_bridge.generalized_components.attention import (
            AttentionBridge,
        )
    except ImportError:
        return None
    return AttentionBridge


def _attention_layers(model: Any) -> list[torch.nn.Module] | None:
    """Return the attention bridges of ``model``'s blocks, or None if it has none to switch."""
    bridge_class = _bridge_class()
    config = getattr(getattr(model, "original_model", None), "config", None)
    if bridge_class is None or config is None or not hasattr(config, "_attn_implementation"):
        return None
    layers = [getattr(block, "attn", None) for block in getattr(model, "blocks", [])]
    if not layers or not all(isinstance(layer, bridge_class) for layer in layers):
        return None
    if any(layer.original_component is None for layer in layers):
        return None
    return layers


_GROUPED_SDPA = "tl_privacy_grouped_sdpa"
"""Name under which :func:`_grouped_sdpa` is registered with transformers."""


def _attention_function() -> str:
    """Register :func:`_grouped_sdpa` with transformers once and return its name, or return
    ``"sdpa"`` when this transformers version has no attention and mask registries.

    The name gets SDPA's mask function too: transformers builds no padding mask at all for
    an attention name its mask registry does not know.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return "sdpa"
    if _GROUPED_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(_GROUPED_SDPA, _grouped_sdpa)
    if _GROUPED_SDPA not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(_GROUPED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return _GROUPED_SDPA


def _grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with grouped-query attention left to the kernel under a
    mask as well.

    With a mask, transformers copies each key and value head once per query head of its
    group before calling SDPA (``repeat_kv``) on the CPU. Behind the candidate tries' KV
    cache (SmolLM2: 9 query heads over 3 key-value heads, bfloat16, 75 queries x 410 keys)
    one layer's attention took 4.2 ms that way against 1.8 ms with ``enable_gqa=True``.
    Every other case goes to transformers' own function.

    NOTE: on an AMD EPYC without AMX (2 threads), PyTorch's CPU kernel took 14.5 ms for one
    SmolLM2 layer of the tries (8 rows x 256 queries x 361 keys, bfloat16). Its bfloat16 path
    calls MKL's bfloat16 GEMM, which runs MKL's float32 kernel there, and perf put about a
    quarter of an evaluation's samples in that kernel. Two bfloat16 batched products around a
    bfloat16 softmax took 6.7 to 10 ms, but their rounded scores failed the direct KV-cache
    check of :func:`tl_privacy.metrics.tree_cache_mode`, and in one trial the evaluation of the
    demo's integrated-gradients set then took 539 s instead of about 110 s. That path is not
    used.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if attention_mask is None or groups <= 1 or not plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    # With a mask, transformers' SDPA call is not causal either: the mask alone decides.
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=True,
    )
    return output.transpose(1, 2).contiguous(), None


def _logits_match(model: Any, layers: list[torch.nn.Module]) -> bool:
    """Compare ``model``'s logits with and without fused attention on a padded batch, once
    per model (see :func:`fused_attention`)."""
    if model in _MATCHES:
        return _MATCHES[model]
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    vocab = int(model.cfg.d_vocab)
    tokens = (torch.arange(1, 19, device=device) % vocab).view(3, 6)
    # Right and left padding: a kernel that ignores the mask is exact on the first alone.
    mask = torch.ones_like(tokens)
    mask[1, -2:] = 0
    mask[2, :2] = 0
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            expected = model(tokens, attention_mask=mask, return_type="logits").float()
            switch = _switch_on(model, layers)
            try:
                actual = model(tokens, attention_mask=mask, return_type="logits").float()
            finally:
                _release(model, switch)
    except (TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError) as error:
        logger.info("fused attention failed on %s: %s", type(model).__name__, error)
        matches = False
    else:
        real = mask.bool()
        tolerance = 1e-4 * float(expected[real].abs().max()) + 1e-5
        matches = bool((actual[real] - expected[real]).abs().max() <= tolerance)
        if not matches:
            logger.info(
                "fused attention changes the logits of %s, so it is not used", type(model).__name__
            )
    _MATCHES[model] = matches
    return matches
