"""Fused attention in evaluation: same logits, restored model, off wherever a hook needs it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tl_privacy import models
from tl_privacy.attention import fused_attention, is_fused
from tl_privacy.evaluation import EvaluationConfig, evaluate
from tl_privacy.metrics import tree_cache_mode

PATTERN_HOOK = "blocks.0.attn.hook_pattern"


@pytest.fixture(scope="module")
def llama_bridge(tiny_llama_folder):
    """A random Hugging Face Llama behind a TransformerBridge, like SmolLM2."""
    return models.load_model(tiny_llama_folder)


@pytest.fixture(scope="module")
def padded():
    input_ids = torch.arange(3, 27).view(2, 12)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -4:] = 0
    return input_ids, attention_mask


def _logits(model, padded):
    input_ids, attention_mask = padded
    return model(input_ids, attention_mask=attention_mask, return_type="logits")


def _eager_state(model) -> tuple[bool, bool, str]:
    bridge_forward = any("forward" in block.attn.__dict__ for block in model.blocks)
    wrapped_forward = any(
        "forward" in block.attn.original_component.__dict__ for block in model.blocks
    )
    return bridge_forward, wrapped_forward, model.original_model.config._attn_implementation


def test_fused_logits_match_eager(llama_bridge, padded):
    real = padded[1].bool()
    with torch.no_grad():
        eager = _logits(llama_bridge, padded)
        with fused_attention(llama_bridge) as fused:
            assert fused
            assert is_fused(llama_bridge)
            logits = _logits(llama_bridge, padded)

    torch.testing.assert_close(logits[real], eager[real], atol=1e-4, rtol=1e-4)


def test_model_restored_after_block(llama_bridge, padded):
    before = _eager_state(llama_bridge)
    fired = []

    with torch.no_grad():
        with pytest.raises(KeyError):
            with fused_attention(llama_bridge):
                raise KeyError("inside the block")
        with llama_bridge.hooks([(PATTERN_HOOK, lambda pattern, hook: fired.append(1))]):
            _logits(llama_bridge, padded)

    assert _eager_state(llama_bridge) == before
    assert not is_fused(llama_bridge)
    assert fired == [1]


def test_attached_attention_hook_keeps_eager(llama_bridge, padded):
    fired = []
    hooks = [(PATTERN_HOOK, lambda pattern, hook: fired.append(1))]

    with torch.no_grad(), llama_bridge.hooks(hooks):
        with fused_attention(llama_bridge) as fused:
            _logits(llama_bridge, padded)

    assert not fused
    assert fired == [1]


@pytest.mark.parametrize("name", [PATTERN_HOOK, "blocks.0.hook_resid_pre", "hook_embed"])
def test_pending_hook_outside_mlp_keeps_eager(llama_bridge, name):
    with torch.no_grad(), fused_attention(llama_bridge, [name]) as fused:
        assert not fused


def test_gradients_keep_eager(llama_bridge):
    with fused_attention(llama_bridge) as fused:
        assert not fused


def test_native_model_keeps_eager(tiny_model):
    with torch.no_grad(), fused_attention(tiny_model) as fused:
        assert not fused


def test_nested_blocks_stay_fused(llama_bridge):
    with torch.no_grad(), fused_attention(llama_bridge):
        with fused_attention(llama_bridge) as inner:
            assert inner
        assert is_fused(llama_bridge)
        assert "forward" in llama_bridge.blocks[0].attn.__dict__

    assert not is_fused(llama_bridge)


def test_cache_mode_checked_per_path(llama_bridge):
    eager = tree_cache_mode(llama_bridge)
    with torch.no_grad(), fused_attention(llama_bridge):
        fused = tree_cache_mode(llama_bridge)

    assert eager in ("direct", "renamed")
    assert fused in ("direct", "renamed")


def test_evaluation_agrees_with_eager(llama_bridge, tiny_tokenizer, synthetic_corpus):
    records = synthetic_corpus.train[:4]
    heldout = synthetic_corpus.heldout[:2]
    config = EvaluationConfig(n_candidates=8, general_text_tokens=200, precision="float32")
    hooks = [("blocks.1.mlp.hook_post", lambda activation, hook: activation * 0.5)]

    fused = evaluate(llama_bridge, tiny_tokenizer, records, heldout, fwd_hooks=hooks, config=config)
    eager_config = dataclasses.replace(config, fused_attention=False)
    eager = evaluate(
        llama_bridge, tiny_tokenizer, records, heldout, fwd_hooks=hooks, config=eager_config
    )

    assert [item["rank"] for item in fused.items] == [item["rank"] for item in eager.items]
    assert fused.exposure_mean == pytest.approx(eager.exposure_mean)
    assert fused.extraction_exact == eager.extraction_exact
    assert fused.perplexity_general == pytest.approx(eager.perplexity_general, rel=1e-4)
    assert fused.perplexity_train == pytest.approx(eager.perplexity_train, rel=1e-4)


def test_fused_path_skips_pattern_hook(llama_bridge, padded):
    fired = []
    hooks = [(PATTERN_HOOK, lambda pattern, hook: fired.append(1))]

    with torch.no_grad(), fused_attention(llama_bridge):
        # Attached after entering without being named in hook_names.
        with llama_bridge.hooks(hooks):
            _logits(llama_bridge, padded)

    assert fired == []


def test_nested_attention_hook_runs_eager(llama_bridge, padded):
    fired = []
    hooks = [(PATTERN_HOOK, lambda pattern, hook: fired.append(1))]

    with torch.no_grad(), fused_attention(llama_bridge):
        with fused_attention(llama_bridge, [PATTERN_HOOK]) as inner:
            assert not inner
            assert not is_fused(llama_bridge)
            with llama_bridge.hooks(hooks):
                _logits(llama_bridge, padded)
        assert is_fused(llama_bridge)

    assert fired == [1]
    assert not is_fused(llama_bridge)


def test_blocks_may_close_out_of_order(llama_bridge):
    before = _eager_state(llama_bridge)
    with torch.no_grad():
        first, second = fused_attention(llama_bridge), fused_attention(llama_bridge)
        first.__enter__()
        second.__enter__()
        # As when two threads share the model: the first block closes first.
        first.__exit__(None, None, None)
        assert is_fused(llama_bridge)
        second.__exit__(None, None, None)

    assert not is_fused(llama_bridge)
    assert _eager_state(llama_bridge) == before


def test_callable_hook_name_keeps_eager(llama_bridge):
    with torch.no_grad(), fused_attention(llama_bridge, [lambda name: True]) as fused:
        assert not fused


def test_grouped_sdpa_matches_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tl_privacy.attention import _grouped_sdpa

    module = torch.nn.Module()
    module.num_key_value_groups = 3
    module.is_causal = True
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, 5, 8, generator=generator)
    key, value = torch.randn(2, 2, 9, 8, generator=generator), torch.randn(2, 2, 9, 8)
    visible = torch.rand(2, 1, 5, 9, generator=generator) > 0.4
    visible[..., 0] = True
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)

    for attention_mask in (mask, None):
        ours, _ = _grouped_sdpa(module, query, key, value, attention_mask, scaling=0.3)
        theirs, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=0.3)
        torch.testing.assert_close(ours, theirs)


def test_fused_blocks_use_grouped_sdpa(llama_bridge, padded, monkeypatch):
    from tl_privacy import attention

    calls = []
    grouped = attention._grouped_sdpa

    def counting(module, query, key, value, attention_mask, *args, **kwargs):
        calls.append(key.shape[1] < query.shape[1])
        return grouped(module, query, key, value, attention_mask, *args, **kwargs)

    # The registry keeps the function object, so the spy replaces it there.
    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, attention._GROUPED_SDPA, counting)
    with torch.no_grad(), fused_attention(llama_bridge) as fused:
        calls.clear()  # the first block on a model runs its own check pass
        _logits(llama_bridge, padded)

    assert fused
    # The tiny Llama has 4 query heads over 2 key-value heads in each of its 2 layers.
    assert calls == [True, True]


def test_fused_greedy_left_padding(llama_bridge):
    # greedy_decode pads on the left, where attention needs the padding mask.
    from tl_privacy.extraction import greedy_decode

    generator = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(5, 500, (length,), generator=generator) for length in (12, 4, 7)]
    with torch.no_grad():
        eager = greedy_decode(llama_bridge, prefixes, 8)
        with fused_attention(llama_bridge) as fused:
            tokens = greedy_decode(llama_bridge, prefixes, 8)

    assert fused
    assert [row.tolist() for row in tokens] == [row.tolist() for row in eager]
