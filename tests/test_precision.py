"""Autocast settings: resolving the precision and casting frozen weights once per block."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tl_privacy.precision import weights_cast_once


class CountCasts(TorchDispatchMode):
    """Count the casts of float32 tensors of one shape to bfloat16."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape = shape
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            source, dtype = args[0], kwargs.get("dtype")
            if source.shape == self.shape and dtype == torch.bfloat16:
                self.count += 1
        return func(*args, **kwargs)


@pytest.fixture
def linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    layer.requires_grad_(False)
    return layer


def _two_passes(layer: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    first = layer(inputs)
    second = layer(inputs)
    return (first.float() + second.float()).sum()


def test_each_weight_is_cast_once(linear):
    inputs = torch.randn(4, 16, requires_grad=True)

    with CountCasts(linear.weight.shape) as counted:
        with weights_cast_once(linear, "bfloat16"):
            _two_passes(linear, inputs).backward(inputs=[inputs])
    assert counted.count == 1

    with CountCasts(linear.weight.shape) as counted:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _two_passes(linear, inputs).backward(inputs=[inputs])
    assert counted.count == 2


def test_no_weight_gradient_and_flags_restored(linear):
    inputs = torch.randn(4, 16, requires_grad=True)

    with weights_cast_once(linear, "bfloat16"):
        assert all(param.requires_grad for param in linear.parameters())
        _two_passes(linear, inputs).backward(inputs=[inputs])

    assert inputs.grad is not None
    assert all(param.grad is None for param in linear.parameters())
    assert not any(param.requires_grad for param in linear.parameters())


def test_flags_restored_when_the_block_raises(linear):
    linear.bias.requires_grad_(True)

    with pytest.raises(RuntimeError, match="inside"):
        with weights_cast_once(linear, "bfloat16"):
            raise RuntimeError("inside")

    assert [p.requires_grad for p in linear.parameters()] == [False, True]
    assert not torch.is_autocast_enabled("cpu")


def test_float32_turns_an_outer_autocast_off(linear):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with weights_cast_once(linear, "float32"):
            assert not torch.is_autocast_enabled("cpu")
            assert linear(torch.randn(2, 16)).dtype == torch.float32
            assert not any(param.requires_grad for param in linear.parameters())


def test_outer_autocast_keeps_no_stale_weights(linear):
    inputs = torch.randn(2, 16)

    # The user's own autocast context outlives both blocks.
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        with weights_cast_once(linear, "bfloat16"):
            before = linear(inputs)
        linear.weight.zero_()
        with weights_cast_once(linear, "bfloat16"):
            after = linear(inputs)

    assert not torch.equal(before, after)
    assert torch.equal(after, linear.bias.to(torch.bfloat16).expand_as(after))
