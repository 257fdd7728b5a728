"""Choice of bfloat16 autocast, shared by the fine-tune and the localizer."""

from __future__ import annotations

from typing import Any

import torch


def resolve_precision(model: Any, precision: str) -> str:
    """Resolve ``"auto"`` to ``"bfloat16"`` or ``"float32"`` for the model's device.

    ``"auto"`` is bfloat16 on CUDA devices that support it and on CPUs with AVX512-BF16 or
    AMX, where bfloat16 matrix products run natively. Elsewhere autocast would emulate
    bfloat16 and be slower, so it is float32. On one thread of an AVX512-BF16 CPU (AMD EPYC),
    a SmolLM2-135M step (batch 8, about 100 tokens, MLP weights trained) took 4.0 s in
    bfloat16 against 6.9 s in float32, with losses equal to 3 decimals.
    """
    if precision != "auto":
        return precision
    device = next(iter(model.parameters())).device
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type != "cpu":
        return "float32"
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # private helpers, absent from some torch builds
        native = False
    return "bfloat16" if native else "float32"


def autocast(model: Any, precision: str):
    """Return an autocast context for the model's device, on when ``precision`` means bfloat16."""
    resolved = resolve_precision(model, precision)
    if resolved not in ("bfloat16", "float32"):
        raise ValueError(f"precision must be 'auto', 'bfloat16' or 'float32', got {precision!r}.")
    device = next(iter(model.parameters())).device
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolved == "bfloat16")
