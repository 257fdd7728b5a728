"""Logits at selected positions only, unembedded from the model's final residual stream.

The losses of localization, slimming and integrated gradients read a few hundred
positions of a batch, and each position's logits span the vocabulary (49,152 entries on
SmolLM2). Taking ``logits[:, :-1][selected]`` from the model's full output writes a
``[batch, pos, d_vocab]`` tensor in the forward pass, and its backward pass fills that
shape with zeros once per selection before scattering the rows back. Stopping the model
at the unembedding and unembedding the selected positions alone keeps every
vocabulary-sized tensor as small as the selection. In a microbenchmark with SmolLM2's
shapes (8 records of about 105 tokens, bfloat16, 2 CPU threads), the loss terms' forward and
backward pass took 0.17 s this way against 0.30 s from the full logits. A localization step
took 1.17 s against 1.31 s.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_privacy.hooks import has_module_hooks, model_logits

# Whether a model's logits are the unembedding of its final residual stream, per model.
# The keys are weak references, so models can be freed.
_HEAD_MATCHES: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


class _StopBeforeUnembed(Exception):
    """Raised inside the forward pass once the final residual stream is captured."""


def predicting_logits(
    model: Any,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    selections: Sequence[Bool[Tensor, "batch pos_1"]],
) -> list[Float[Tensor, "n_selected d_vocab"]]:
    """Return ``logits[:, :-1][selection]`` for each selection, in the model's logits dtype.

    Position ``t`` of ``logits[:, :-1]`` predicts token ``t + 1``, as in
    :mod:`tl_privacy.objectives`. Where the model allows it, the forward pass stops at the
    unembedding and only the selected positions are unembedded, so that no
    ``[batch, pos, d_vocab]`` tensor is built in either direction.

    Three cases compute the full logits instead:

    - a hook attached to the unembedding, which would not fire otherwise;
    - a forward hook on the model or its wrapped Hugging Face model, which could change the
      logits;
    - a model whose logits are not its unembedding of the final residual stream (a logit
      soft-cap, for example). The first call on a model checks this on its own forward pass
      and returns the rows of the full logits.

    Raises:
        ValueError: when a selection is not shaped ``[batch, pos - 1]``.

    NOTE: while the forward pass runs, a pre-hook on ``model.unembed`` stops any pass of the
    same model, so do not run the model from another thread meanwhile.
    """
    expected = (input_ids.shape[0], input_ids.shape[1] - 1)
    for selection in selections:
        if tuple(selection.shape) != expected:
            raise ValueError(
                f"a selection has shape {tuple(selection.shape)}, but the predicting positions "
                f"of input_ids {tuple(input_ids.shape)} are {expected}; select over "
                "logits[:, :-1], as tl_privacy.objectives.shifted_targets does"
            )

    unembed = getattr(model, "unembed", None)
    usable = (
        isinstance(unembed, torch.nn.Module)
        and not has_module_hooks(unembed)
        and not _changes_outputs(model)
    )
    matches = _HEAD_MATCHES.get(model) if usable else False
    if matches is None:
        logits = _checked_logits(model, input_ids, attention_mask)
    elif matches:
        residual = final_residual(model, input_ids, attention_mask)
        if residual is None:
            raise RuntimeError(
                f"{type(model).__name__} did not call its unembedding this time, though it "
                "did before; tl_privacy cannot read its logits at selected positions"
            )
        predicting = residual[:, :-1]
        return [_unembed(model, predicting[selection]) for selection in selections]
    else:
        logits = model_logits(model, input_ids, attention_mask)
    return [logits[:, :-1][selection] for selection in selections]


def _checked_logits(
    model: Any, input_ids: Tensor, attention_mask: Tensor | None
) -> Float[Tensor, "batch pos d_vocab"]:
    """Run ``model`` in full, record whether its logits are its unembedding of the
    residual stream that enters the unembedding, and return the logits."""
    captured: list[Tensor] = []

    def capture(module: Any, args: tuple[Any, ...]) -> None:
        captured.append(args[0])

    handle = model.unembed.register_forward_pre_hook(capture)
    try:
        logits = model_logits(model, input_ids, attention_mask)
    finally:
        handle.remove()
    matches = False
    # final_residual stops at the first call, so a model that unembeds twice is not read.
    if len(captured) == 1:
        residual = captured[0]
        with torch.no_grad():
            # The same call on the same tensor as the model's own, so equal bit for bit
            # unless something changes the logits after the unembedding.
            again = model.unembed(residual.detach())
        matches = again.shape == logits.shape and bool(torch.equal(again, logits.detach()))
    _HEAD_MATCHES[model] = matches
    return logits


def final_residual(
    model: Any,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos d_model"] | None:
    """Run ``model`` up to its unembedding and return the unembedding's input (the residual
    stream after the final normalization), or None if the unembedding never ran."""
    captured: dict[str, Tensor] = {}

    def stop(module: Any, args: tuple[Any, ...]) -> None:
        captured["residual"] = args[0]
        raise _StopBeforeUnembed

    handle = model.unembed.register_forward_pre_hook(stop)
    try:
        model_logits(model, input_ids, attention_mask)
    except _StopBeforeUnembed:
        pass
    finally:
        handle.remove()
    return captured.get("residual")


def _changes_outputs(model: Any) -> bool:
    """Return whether a forward hook on ``model`` or its wrapped model could change the logits."""
    for module in (model, getattr(model, "original_model", None)):
        if isinstance(module, torch.nn.Module) and module._forward_hooks:
            return True
    return False


def _unembed(model: Any, rows: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_vocab"]:
    # The backward pass of [0] fills a zero tensor as large as the output (hundreds of rows
    # x 49,152 values per SmolLM2 step) and copies the gradient in. squeeze's is a view.
    return model.unembed(rows.unsqueeze(0)).squeeze(0)
