"""Hard-concrete gates: closed forms, numerical edge cases and the gate hooks."""

from __future__ import annotations

import math

import pytest
import torch

from tests._memorized import make_tiny_model
from tl_privacy import HardConcreteMask, UnsupportedModelError
from tl_privacy.masks import GAMMA, ZETA

DRAWS = 100_000


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(d_mlp=64)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def draw_gates(log_alpha: float, temperature: float = 2 / 3):
    mask = HardConcreteMask(1, DRAWS, temperature=temperature, seed=0)
    with torch.no_grad():
        mask.log_alpha.fill_(log_alpha)
    mask.train()
    return mask, mask.gate(0)


@pytest.mark.parametrize("log_alpha", [-5.0, 0.0, 5.0])
def test_sampled_gates_match_closed_form(log_alpha):
    mask, gates = draw_gates(log_alpha)

    p_zero = (gates == 0).float().mean().item()
    p_one = (gates == 1).float().mean().item()

    assert abs(p_zero - mask.prob_closed()[0, 0].item()) < 0.01
    assert abs(p_one - mask.prob_open()[0, 0].item()) < 0.01


def test_closed_form_values():
    beta = 2 / 3
    mask = HardConcreteMask(1, 1, temperature=beta)
    with torch.no_grad():
        mask.log_alpha.fill_(0.0)

    expected_zero = 1 / (1 + math.exp(-beta * math.log(-GAMMA / ZETA)))
    expected_one = 1 / (1 + math.exp(beta * math.log((1 - GAMMA) / (ZETA - 1))))

    assert mask.prob_closed().item() == pytest.approx(expected_zero, rel=1e-6)
    assert mask.prob_open().item() == pytest.approx(expected_one, rel=1e-6)


def test_l0_term_equals_closed_form():
    mask = HardConcreteMask(3, 5, seed=0)
    with torch.no_grad():
        mask.log_alpha.copy_(torch.linspace(-4, 4, 15).view(3, 5))

    closed_form = torch.sigmoid(mask.temperature * math.log(-GAMMA / ZETA) - mask.log_alpha)

    assert torch.allclose(mask.expected_closed(), closed_form.sum())
    mask.expected_closed().backward()
    assert torch.isfinite(mask.log_alpha.grad).all()
    assert (mask.log_alpha.grad < 0).all()


@pytest.mark.parametrize("u_value", [0.0, 1.0])
@pytest.mark.parametrize("log_alpha", [-20.0, 0.0, 20.0])
def test_uniform_extremes_give_finite_gates(u_value, log_alpha):
    mask = HardConcreteMask(1, 4)
    with torch.no_grad():
        mask.log_alpha.fill_(log_alpha)

    gates = mask.gates_from_uniform(torch.full((1, 4), u_value))
    gates.sum().backward()

    assert torch.isfinite(gates).all()
    assert ((gates >= 0) & (gates <= 1)).all()
    assert torch.isfinite(mask.log_alpha.grad).all()


def test_temperature_must_be_positive():
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            HardConcreteMask(2, 4, temperature=temperature)


def test_init_open_prob_sets_log_alpha():
    mask = HardConcreteMask(4, 8, init_open_prob=0.9)

    open_prob = 1 - mask.prob_closed()

    assert torch.allclose(open_prob, torch.full((4, 8), 0.9), atol=1e-6)
    assert torch.unique(mask.log_alpha).numel() == 1


def test_eval_gates_are_deterministic():
    mask = HardConcreteMask(2, 16, seed=0).eval()

    first, second = mask(), mask()

    assert torch.equal(first, second)
    assert torch.equal(first, mask.deterministic_gates())


def test_gates_are_cached_through_hook_points():
    mask = HardConcreteMask(2, 16, seed=0).eval()

    _, cache = mask.run_with_cache()

    assert set(cache.keys()) == {"layers.0.hook_gate", "layers.1.hook_gate"}
    assert torch.equal(cache["layers.1.hook_gate"], mask.deterministic_gates()[1])


def test_for_model_rejects_model_without_hook_points():
    class NoHooks(torch.nn.Module):
        class cfg:
            n_layers, d_mlp = 2, 8

        def run_with_hooks(self, *args, **kwargs): ...
        def hooks(self, *args, **kwargs): ...
        def add_hook(self, *args, **kwargs): ...

        hook_dict: dict = {}

    with pytest.raises(UnsupportedModelError, match="blocks.0.mlp.hook_post"):
        HardConcreteMask.for_model(NoHooks())


def test_closed_layer_equals_zero_ablation(model, tokens):
    mask = HardConcreteMask.for_model(model).eval()
    with torch.no_grad():
        mask.log_alpha[1].fill_(-50.0)
        mask.log_alpha[0].fill_(50.0)

    def zero_layer(activation, hook):
        return torch.zeros_like(activation)

    with torch.no_grad():
        gated = model.run_with_hooks(tokens, fwd_hooks=mask.fwd_hooks())
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mlp.hook_post", zero_layer)])

    assert torch.equal(gated, zeroed)


def test_gate_hook_does_not_modify_input(model, tokens):
    mask = HardConcreteMask.for_model(model, seed=0)
    seen = {}

    def record(activation, hook):
        seen["before"] = activation.clone()
        seen["tensor"] = activation
        return activation

    with torch.no_grad():
        model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.0.mlp.hook_post", record), *mask.fwd_hooks()]
        )

    assert torch.equal(seen["tensor"], seen["before"])


def test_mask_shape_must_match_model(model):
    mask = HardConcreteMask(3, 64)

    with pytest.raises(ValueError, match="n_layers=3"), mask.applied(model):
        pass


def test_attach_and_detach(model, tokens):
    mask = HardConcreteMask.for_model(model).eval()
    with torch.no_grad():
        mask.log_alpha.fill_(-50.0)
        clean = model(tokens)

        mask.attach(model)
        masked = model(tokens)
        with pytest.raises(RuntimeError, match="already attached"):
            mask.attach(model)
        mask.detach()
        restored = model(tokens)

    assert not torch.equal(clean, masked)
    assert torch.equal(clean, restored)
    assert all(not model.hook_dict[f"blocks.{i}.mlp.hook_post"].fwd_hooks for i in range(2))


def test_attach_again_after_reset_hooks(model, tokens):
    mask = HardConcreteMask.for_model(model).eval()
    with torch.no_grad():
        mask.log_alpha.fill_(-50.0)
        mask.attach(model)
        masked = model(tokens)
        model.reset_hooks()

        mask.attach(model)
        again = model(tokens)
        mask.detach()

    assert torch.equal(masked, again)
    assert all(not model.hook_dict[f"blocks.{i}.mlp.hook_post"].fwd_hooks for i in range(2))


def test_gate_width_mismatch_error(tokens):
    other = make_tiny_model(d_mlp=32)
    mask = HardConcreteMask(2, 64)

    with pytest.raises(ValueError, match=r"d_mlp=64.*\(2, 12, 32\)"):
        other.run_with_hooks(tokens, fwd_hooks=mask.fwd_hooks())


def test_save_load_round_trip(tmp_path):
    mask = HardConcreteMask(2, 64, temperature=0.3, init_open_prob=0.9, seed=7)
    with torch.no_grad():
        mask.log_alpha.normal_()

    mask.save(tmp_path / "mask")
    loaded = HardConcreteMask.load(tmp_path / "mask")

    assert torch.equal(loaded.log_alpha, mask.log_alpha)
    assert (loaded.temperature, loaded.init_open_prob, loaded.seed) == (0.3, 0.9, 7)
    assert torch.equal(loaded.prob_closed(), mask.prob_closed())


def test_damaged_mask_load_error(tmp_path):
    HardConcreteMask(2, 64).save(tmp_path / "mask")
    (tmp_path / "mask" / "config.json").write_text("{}")

    with pytest.raises(ValueError, match="damaged mask"):
        HardConcreteMask.load(tmp_path / "mask")
