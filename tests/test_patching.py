"""The ablation hooks compose with ``transformer_lens.patching`` and ``run_with_cache``.

The privacy neurons' ablation is the corrupted run: the patching functions copy clean
activations into it. That works because TransformerLens 4.3's ``run_with_hooks`` removes only
the hooks it added, and hooks at one hook point run in the order they were added, so a patch
overwrites the ablated activation. The tests pin both facts with exact values on two tiny
models: a TL-native one and a Hugging Face Llama loaded through ``load_model``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformer_lens import patching
from transformers import LlamaConfig, LlamaForCausalLM

from tl_privacy.hooks import mlp_post_name
from tl_privacy.models import load_model
from tl_privacy.neurons import PrivacyNeurons

TEXT = "Reach Dana Whitfield at dana.whitfield@example.com or (212) 555-0143."
NEURONS_PER_LAYER = 8
ATOL = 1e-4


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A Hugging Face folder with a random 2-layer Llama (d_model 64, d_mlp 128).

    Its weights are drawn with standard deviation 0.3 instead of Llama's 0.02, because at
    0.02 the logits are nearly uniform and ablating 8 neurons moves a log-probability by
    only about 1e-4 nats, too little to tell from float32 noise.
    """
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf_model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("patching-llama")
    hf_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(params=["native", "llama"])
def model(request: pytest.FixtureRequest):
    """A tiny TL-native bridge, or a tiny Llama loaded from a Hugging Face folder."""
    if request.param == "native":
        return request.getfixturevalue("tiny_model")
    return load_model(request.getfixturevalue("llama_folder"))


@pytest.fixture
def tokens(tiny_tokenizer) -> torch.Tensor:
    ids = tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    return torch.tensor([[tiny_tokenizer.bos_token_id, *ids]])


def last_token_log_prob(tokens: torch.Tensor):
    """Metric: log-probability (nats) of the last token given the tokens before it."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -2].log_softmax(dim=-1)[tokens[0, -1]]

    return metric


def neurons_in(model, layers: list[int]) -> PrivacyNeurons:
    """The NEURONS_PER_LAYER most active neurons (mean |hook_post|) of each of ``layers``."""
    mask = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp, dtype=torch.bool)
    probe = torch.arange(1, 17)[None] % int(model.cfg.d_vocab)
    _, cache = model.run_with_cache(probe)
    for layer in layers:
        activity = cache[mlp_post_name(layer)][0].abs().mean(dim=0)
        mask[layer, activity.topk(NEURONS_PER_LAYER).indices] = True
    return PrivacyNeurons(mask=mask, method="test")


def hook_counts(model) -> list[int]:
    return [len(model.hook_dict[mlp_post_name(L)].fwd_hooks) for L in range(model.cfg.n_layers)]


@contextmanager
def ablation(neurons: PrivacyNeurons, model, attach_with: str) -> Iterator[None]:
    """Ablate for the block with ``neurons.ablated`` or with ``neurons.attach``."""
    if attach_with == "ablated":
        with neurons.ablated(model):
            yield
        return
    handles = neurons.attach(model)
    try:
        yield
    finally:
        handles.remove()


def metric_value(model, tokens: torch.Tensor, neurons: PrivacyNeurons | None = None) -> float:
    hooks = [] if neurons is None else neurons.ablation_hooks()
    return float(last_token_log_prob(tokens)(model.run_with_hooks(tokens, fwd_hooks=hooks)))


@pytest.mark.parametrize("attach_with", ["ablated", "attach"])
def test_mlp_out_sweep_runs_on_ablation(model, tokens, attach_with: str) -> None:
    metric = last_token_log_prob(tokens)
    last = model.cfg.n_layers - 1
    # Neurons in the last layer only: patching its clean mlp_out at the predicting position
    # undoes the whole ablation there, and no other patch changes the metric.
    neurons = neurons_in(model, [last])
    with torch.no_grad():
        clean = metric_value(model, tokens)
        ablated = metric_value(model, tokens, neurons)
        _, clean_cache = model.run_with_cache(tokens)
        unablated = patching.get_act_patch_mlp_out(model, tokens, clean_cache, metric)
        with ablation(neurons, model, attach_with):
            during = hook_counts(model)
            results = patching.get_act_patch_mlp_out(model, tokens, clean_cache, metric)
            after_sweep = hook_counts(model)

    expected_counts = [1 if L == last else 0 for L in range(model.cfg.n_layers)]
    assert during == expected_counts
    assert after_sweep == expected_counts
    assert hook_counts(model) == [0] * model.cfg.n_layers
    assert abs(clean - ablated) > 1e-3

    assert results.shape == (model.cfg.n_layers, tokens.shape[1])
    assert torch.allclose(unablated, torch.full_like(unablated, clean), atol=ATOL)
    assert not torch.allclose(results, unablated, atol=ATOL)
    assert results[last, -2].item() == pytest.approx(clean, abs=ATOL)
    others = torch.ones_like(results, dtype=torch.bool)
    others[last, -2] = False
    assert torch.allclose(results[others], torch.full_like(results[others], ablated), atol=ATOL)


@pytest.mark.parametrize("attach_with", ["ablated", "attach"])
def test_neuron_sweep_restores_one_neuron(model, tokens, attach_with: str) -> None:
    metric = last_token_log_prob(tokens)
    neurons = neurons_in(model, list(range(model.cfg.n_layers)))
    index_df = pd.DataFrame(neurons.indices(), columns=["layer", "neuron"])

    def restore_neuron(corrupted, index, clean):
        _, neuron = index
        corrupted[..., neuron] = clean[..., neuron]
        return corrupted

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(tokens)
        clean = metric_value(model, tokens)
        with ablation(neurons, model, attach_with):
            results = patching.generic_activation_patch(
                model,
                tokens,
                clean_cache,
                metric,
                restore_neuron,
                "post",
                index_df=index_df,
            )
            after_sweep = hook_counts(model)

        # In the first layer a neuron's clean activation is also its value when it alone is
        # left out of the ablation, because nothing before it is ablated.
        first_layer = [row for row in index_df.itertuples() if row.layer == 0]
        expected = []
        for row in first_layer:
            mask = neurons.mask.clone()
            mask[row.layer, row.neuron] = False
            expected.append(metric_value(model, tokens, PrivacyNeurons(mask=mask)))

    assert after_sweep == [1] * model.cfg.n_layers
    assert hook_counts(model) == [0] * model.cfg.n_layers
    assert results.shape == (len(index_df),)
    assert not torch.allclose(results, torch.full_like(results, clean), atol=ATOL)
    observed = results[[row.Index for row in first_layer]]
    assert torch.allclose(observed, torch.tensor(expected), atol=ATOL)


@pytest.mark.parametrize("attach_with", ["ablated", "attach"])
def test_run_with_cache_records_ablation(model, tokens, attach_with: str) -> None:
    neurons = neurons_in(model, list(range(model.cfg.n_layers)))
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(tokens)
        with ablation(neurons, model, attach_with):
            _, cache = model.run_with_cache(tokens)
            after_cache = hook_counts(model)
            logits_after_cache = model(tokens)
        ablated_logits = model.run_with_hooks(tokens, fwd_hooks=neurons.ablation_hooks())

    assert after_cache == [1] * model.cfg.n_layers
    assert hook_counts(model) == [0] * model.cfg.n_layers
    assert torch.allclose(logits_after_cache, ablated_logits, atol=ATOL)
    for layer in range(model.cfg.n_layers):
        activations = cache[mlp_post_name(layer)][0]
        selected = neurons.mask[layer]
        assert torch.count_nonzero(activations[:, selected]) == 0
        assert torch.count_nonzero(clean_cache[mlp_post_name(layer)][0][:, selected]) > 0
    # The first layer's other neurons see no ablation upstream, so they keep their values.
    first = cache[mlp_post_name(0)][0][:, ~neurons.mask[0]]
    assert torch.allclose(first, clean_cache[mlp_post_name(0)][0][:, ~neurons.mask[0]])


def test_reset_hooks_removes_attached_ablation(model, tokens) -> None:
    neurons = neurons_in(model, [0])
    handles = neurons.attach(model)
    assert hook_counts(model)[0] == 1

    # The ablation hooks are not permanent, so a global reset removes them too.
    model.reset_hooks()
    assert hook_counts(model) == [0] * model.cfg.n_layers
    with torch.no_grad():
        assert metric_value(model, tokens) == pytest.approx(
            metric_value(model, tokens, PrivacyNeurons(mask=torch.zeros_like(neurons.mask)))
        )
    handles.remove()
    assert hook_counts(model) == [0] * model.cfg.n_layers
