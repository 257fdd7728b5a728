"""Model checks and hook bookkeeping shared by masks, ablations and baselines.

Every intervention in tl_privacy is a TransformerLens forward hook on
``blocks.{L}.mlp.hook_post``: the MLP's hidden activations of shape
``[batch, pos, d_mlp]`` (for gated MLPs, ``act(gate) * up``), just before the
output projection. Any model with that hook point, ``cfg.n_layers``,
``cfg.d_mlp``, ``run_with_hooks`` and ``hooks()`` is supported, which covers the
TransformerLens 4 ``TransformerBridge`` and the TransformerLens 3
``HookedTransformer``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

HookFn = Callable[[torch.Tensor, Any], torch.Tensor]
"""A TransformerLens forward hook: ``fn(activation, hook) -> activation``."""

FwdHooks = list[tuple[str, HookFn]]
"""A list of ``(hook name, hook function)`` pairs, as ``run_with_hooks`` takes them."""

MLP_POST = "blocks.{layer}.mlp.hook_post"


class UnsupportedModelError(TypeError):
    """Raised when a model lacks the attributes or hook points tl_privacy needs."""


def mlp_post_name(layer: int) -> str:
    """Return the name of layer ``layer``'s MLP neuron hook point."""
    return MLP_POST.format(layer=layer)


def check_model(model: Any) -> tuple[int, int]:
    """Check that ``model`` exposes what tl_privacy hooks into.

    Returns:
        ``(n_layers, d_mlp)``.

    Raises:
        UnsupportedModelError: naming the first missing attribute or hook point.
    """
    cfg = getattr(model, "cfg", None)
    for attribute in ("n_layers", "d_mlp"):
        if cfg is None or getattr(cfg, attribute, None) is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no cfg.{attribute}; tl_privacy needs a "
                "TransformerLens model (TransformerBridge or HookedTransformer) with MLP layers."
            )
    for method in ("run_with_hooks", "hooks", "add_hook"):
        if not callable(getattr(model, method, None)):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no {method}() method; wrap the model in a "
                "TransformerLens TransformerBridge (TL 4) or HookedTransformer (TL 3)."
            )

    n_layers, d_mlp = int(cfg.n_layers), int(cfg.d_mlp)
    hook_dict = model.hook_dict
    for layer in range(n_layers):
        name = mlp_post_name(layer)
        if name not in hook_dict:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no hook point {name!r}; tl_privacy masks the MLP "
                "neurons there. Attention-only models and architectures without per-layer MLP "
                "hook points are not supported."
            )
    return n_layers, d_mlp


def _hook_point(model: Any, name: str, hook_dict: dict[str, Any] | None = None) -> Any:
    if hook_dict is None:
        hook_dict = model.hook_dict
    try:
        return hook_dict[name]
    except KeyError:
        raise UnsupportedModelError(f"{type(model).__name__} has no hook point {name!r}.") from None


class HookHandles:
    """The forward hooks one call attached, so exactly those can be removed.

    TransformerLens stores a hook point's hooks in ``hook_point.fwd_hooks``; the
    handles we added are found by identity, so hooks that the user attached
    before or after stay in place.
    """

    def __init__(self) -> None:
        self._added: list[tuple[Any, Any]] = []

    def __len__(self) -> int:
        return len(self._added)

    def add(
        self, model: Any, name: str, hook_fn: HookFn, hook_dict: dict[str, Any] | None = None
    ) -> None:
        """Attach ``hook_fn`` at ``name`` and remember its handle.

        ``hook_dict`` is ``model.hook_dict``, passed when the caller has it already.
        """
        hook_point = _hook_point(model, name, hook_dict)
        before = {id(handle) for handle in hook_point.fwd_hooks}
        model.add_hook(name, hook_fn, dir="fwd")
        new = [handle for handle in hook_point.fwd_hooks if id(handle) not in before]
        self._added.extend((hook_point, handle) for handle in new)

    def attached(self) -> bool:
        """Return whether any hook this object added is still attached; ``reset_hooks()`` on
        the model removes them behind its back."""
        return any(
            any(h is handle for h in hook_point.fwd_hooks) for hook_point, handle in self._added
        )

    def remove(self) -> None:
        """Detach every hook this object added; safe to call twice."""
        while self._added:
            hook_point, handle = self._added.pop()
            handle.hook.remove()
            hook_point.fwd_hooks = [h for h in hook_point.fwd_hooks if h is not handle]


def has_module_hooks(module: torch.nn.Module) -> bool:
    """Return whether any PyTorch forward or backward hook is attached to ``module`` or below
    it, TransformerLens hooks included."""
    for child in module.modules():
        for hooks in (
            child._forward_hooks,
            child._forward_pre_hooks,
            child._backward_hooks,
            child._backward_pre_hooks,
        ):
            if hooks:
                return True
    return False


def attach(model: Any, fwd_hooks: Sequence[tuple[str, HookFn]]) -> HookHandles:
    """Attach forward hooks persistently; call ``.remove()`` on the result to detach them.

    If attaching one of them fails, those already attached are removed before the
    error propagates.
    """
    handles = HookHandles()
    # TransformerBridge copies its hook registry into a new hook_dict on every access (0.3 to
    # 0.9 ms on SmolLM2 in two measurements), so one lookup serves every hook.
    hook_dict = model.hook_dict if fwd_hooks else None
    try:
        for name, hook_fn in fwd_hooks:
            handles.add(model, name, hook_fn, hook_dict)
    except BaseException:
        handles.remove()
        raise
    return handles


@contextmanager
def attached(model: Any, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[Any]:
    """Attach forward hooks for the body of a ``with`` block and always remove them.

    Only the hooks added here are removed, also when the body raises; hooks the
    user attached with ``add_hook`` before or inside the block stay attached.
    ``reset_hooks()`` is never called.
    """
    handles = attach(model, fwd_hooks)
    try:
        yield model
    finally:
        handles.remove()


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block; then give every submodule its own training
    flag back, also when the block raises.

    ``model.train(flag)`` would instead set all submodules to the top module's flag, and a
    model whose parts were in different modes would not come back as it was.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def model_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Run ``model`` on token ids and return logits ``[batch, pos, d_vocab]``.

    The attention mask is passed only when the batch has padding, since a causal
    model needs none for right-padded or unpadded rows and some model classes
    reject the argument.
    """
    if attention_mask is None or bool(attention_mask.bool().all()):
        return model(input_ids, return_type="logits")
    return model(input_ids, return_type="logits", attention_mask=attention_mask)
