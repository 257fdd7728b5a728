"""The ground-truth benchmark: neuron weight layout, frozen weights, scoring, end to end."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from tl_privacy import models
from tl_privacy.baselines import select
from tl_privacy.data.tokenization import make_batches
from tl_privacy.hooks import UnsupportedModelError, attached, mlp_post_name
from tl_privacy.injection import (
    CleanTrainingConfig,
    InjectionConfig,
    NeuronSlices,
    ablation_effects,
    choose_neurons,
    inject,
    neuron_parameters,
    recall_precision,
    redact,
    train_without_pii,
    verify_neuron_axes,
)
from tl_privacy.localization import LocalizationConfig, localize
from tl_privacy.neurons import IncompatibleNeuronsError, PrivacyNeurons

# Measured on the end-to-end fixture below, on one CPU thread: 4 e-mails injected into 10
# neurons per layer of a 2 x 512 tiny model. The learned masks found 19 of the 20 injected
# neurons (0.95), and 0.75 to 0.95 with other seeds of the injected set and of the gates.
# A random set of 20 finds 0.02 of them on average.
RECALL_FLOOR = 0.7
E2E_FRACTION = 0.02
E2E_RECORDS = 4
E2E_TYPES = ("EMAIL",)
E2E_LOCALIZATION = LocalizationConfig(
    steps=200,
    l0_weight=1.0,
    init_open_prob=0.9,
    selection="budget",
    pii_types=E2E_TYPES,
    show_progress=False,
)


@pytest.fixture(scope="module")
def tl_native(tiny_tokenizer):
    return models.tiny_model(tiny_tokenizer, d_mlp=256)


@pytest.fixture(scope="module")
def llama(tiny_llama_folder):
    return models.load_model(tiny_llama_folder)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tiny_tokenizer):
    """A random 2-layer GPT-2, whose MLP is made of transposed Conv1D projections."""
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer),
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf_model = GPT2LMHeadModel(config)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    hf_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2(gpt2_folder):
    return models.load_model(gpt2_folder)


def fresh_model(model_name: str, request: pytest.FixtureRequest):
    """A new model of the kind ``model_name``, for tests that change weights."""
    if model_name == "tl_native":
        return models.tiny_model(request.getfixturevalue("tiny_tokenizer"), d_mlp=256)
    folder = "tiny_llama_folder" if model_name == "llama" else "gpt2_folder"
    return models.load_model(request.getfixturevalue(folder))


def post_activations(model, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    stored = {}

    def store(activation, hook):
        stored["value"] = activation.detach().clone()
        return activation

    with torch.no_grad(), attached(model, [(mlp_post_name(layer), store)]):
        model(tokens, return_type="logits")
    return stored["value"]


def zero_neuron(slices: list[NeuronSlices], neuron: int) -> None:
    with torch.no_grad():
        for item in slices:
            item.parameter.index_fill_(item.axis, torch.tensor([neuron]), 0.0)


def parameter_bits(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().view(torch.int32) for name, p in model.named_parameters()}


# ---- layout ----


@pytest.mark.parametrize(
    ("model_name", "expected"),
    [
        # TL-native: in.weight [d_mlp, d_model] rows, in.bias, out.weight [d_model, d_mlp] columns.
        ("tl_native", {("input", 2, 0), ("input", 1, 0), ("output", 2, 1)}),
        # Llama: gate_proj and up_proj rows, down_proj columns, no biases.
        ("llama", {("input", 2, 0), ("output", 2, 1)}),
        # GPT-2 Conv1D stores [in, out]: c_fc.weight columns, c_fc.bias, c_proj.weight rows.
        ("gpt2", {("input", 2, 1), ("input", 1, 0), ("output", 2, 0)}),
    ],
)
def test_layout_found_by_inspection(model_name, expected, request):
    model = request.getfixturevalue(model_name)
    slices = neuron_parameters(model)
    layer_zero = [s for s in slices if s.layer == 0]

    assert {(s.role, s.parameter.dim(), s.axis) for s in layer_zero} == expected
    assert {s.layer for s in slices} == set(range(model.cfg.n_layers))
    if model_name == "llama":
        names = " ".join(s.name for s in layer_zero)
        assert "gate_proj" in names
        assert "up_proj" in names
        assert "down_proj" in names


@pytest.mark.parametrize("model_name", ["tl_native", "llama", "gpt2"])
def test_zeroing_input_slices_zeroes_hook_post(model_name, request):
    model = fresh_model(model_name, request)
    tokens = torch.tensor([[0, 17, 301, 45, 999, 12, 7, 88]])
    slices = neuron_parameters(model)
    last = model.cfg.n_layers - 1
    neuron = 37

    clean = post_activations(model, tokens, last)
    zero_neuron([s for s in slices if s.layer == last and s.role == "input"], neuron)
    zeroed = post_activations(model, tokens, last)

    assert clean[..., neuron].abs().max() > 0
    assert torch.equal(zeroed[..., neuron], torch.zeros_like(zeroed[..., neuron]))
    others = torch.ones(model.cfg.d_mlp, dtype=torch.bool)
    others[neuron] = False
    assert torch.equal(zeroed[..., others], clean[..., others])


@pytest.mark.parametrize("model_name", ["tl_native", "llama", "gpt2"])
def test_verify_axes_accepts_true_layout(model_name, request):
    model = request.getfixturevalue(model_name)
    before = parameter_bits(model)

    verify_neuron_axes(model)

    after = parameter_bits(model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def swapped_axes(slices: list[NeuronSlices]) -> list[NeuronSlices]:
    return [
        NeuronSlices(s.name, s.parameter, s.layer, 1 - s.axis, s.role)
        if s.parameter.dim() == 2
        else s
        for s in slices
    ]


def test_verify_axes_rejects_wrong_axis(tiny_tokenizer):
    # With d_mlp == d_model the swapped axes have the right length, so only the
    # behaviour of the zeroed slices can show that they are wrong.
    square = models.tiny_model(tiny_tokenizer, d_model=128, d_mlp=128)
    slices = neuron_parameters(square)

    verify_neuron_axes(square, slices)
    with pytest.raises(UnsupportedModelError, match="neuron axis"):
        verify_neuron_axes(square, swapped_axes(slices))


def test_verify_axes_rejects_wrong_length(tl_native):
    with pytest.raises(UnsupportedModelError, match="not the neuron axis"):
        verify_neuron_axes(tl_native, swapped_axes(neuron_parameters(tl_native)))


def test_unknown_layout_rejected(tiny_tokenizer):
    model = models.tiny_model(tiny_tokenizer, d_mlp=256)
    # A d_model -> d_model adapter is neither an input nor the output projection.
    model.blocks[0].mlp.adapter = nn.Linear(model.cfg.d_model, model.cfg.d_model)
    with pytest.raises(UnsupportedModelError, match="layer 0.*adapter"):
        neuron_parameters(model)


# ---- choosing and scoring ----


def test_choose_neurons_same_count_per_layer():
    neurons = choose_neurons(3, 512, 0.01, seed=4)

    assert neurons.method == "injected"
    assert neurons.by_layer() == [5, 5, 5]
    assert torch.equal(neurons.mask, choose_neurons(3, 512, 0.01, seed=4).mask)
    assert not torch.equal(neurons.mask, choose_neurons(3, 512, 0.01, seed=5).mask)
    assert choose_neurons(2, 512, 0.001).by_layer() == [1, 1]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_choose_neurons_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction must be in"):
        choose_neurons(2, 64, fraction)


def test_recall_precision_counts():
    truth = torch.zeros(2, 8, dtype=torch.bool)
    truth[0, [1, 2]] = True
    truth[1, [3, 4]] = True
    found = torch.zeros(2, 8, dtype=torch.bool)
    found[0, [1, 5, 6]] = True
    found[1, [3, 4]] = True

    scores = recall_precision(PrivacyNeurons(mask=found), PrivacyNeurons(mask=truth))

    assert scores["recall"] == 3 / 4
    assert scores["precision"] == 3 / 5
    assert scores["recall_by_layer"] == [0.5, 1.0]
    assert scores["true_positives"] == 3


def test_recall_precision_edge_cases():
    truth = torch.zeros(2, 8, dtype=torch.bool)
    truth[1, 0] = True
    empty = PrivacyNeurons(mask=torch.zeros(2, 8, dtype=torch.bool))

    scores = recall_precision(empty, PrivacyNeurons(mask=truth))

    assert scores["recall"] == 0.0
    assert math.isnan(scores["precision"])
    assert math.isnan(scores["recall_by_layer"][0])
    with pytest.raises(ValueError, match="truth is empty"):
        recall_precision(PrivacyNeurons(mask=truth), empty)
    with pytest.raises(IncompatibleNeuronsError):
        recall_precision(PrivacyNeurons(mask=torch.zeros(3, 8, dtype=torch.bool)), empty)


def test_redact_replaces_every_span(synthetic_corpus):
    record = synthetic_corpus.train[0]
    text = redact(record)

    for pii in record.pii_strings():
        assert pii not in text
    assert text.count("[NAME]") == 3
    assert "[EMAIL]" in text


# ---- injection ----


@pytest.mark.parametrize("model_name", ["tl_native", "llama", "gpt2"])
def test_inject_changes_only_chosen_neurons(model_name, request, synthetic_corpus):
    model = fresh_model(model_name, request)
    truth = choose_neurons(model.cfg.n_layers, model.cfg.d_mlp, 0.02, seed=1)
    flags = [p.requires_grad for p in model.parameters()]
    before = parameter_bits(model)
    config = InjectionConfig(max_steps=3, target_extraction=1.0, general_tokens=64)

    result = inject(model, synthetic_corpus.train[:2], truth, config)

    after = parameter_bits(model)
    inside = {s.name: s.neuron_mask(truth.mask[s.layer]) for s in neuron_parameters(model)}
    for name in before:
        outside = (
            ~inside[name] if name in inside else torch.ones_like(before[name], dtype=torch.bool)
        )
        assert torch.equal(after[name][outside], before[name][outside]), name
    changed = [name for name in inside if not torch.equal(after[name], before[name])]
    assert len(changed) == len(inside)
    assert result.frozen_verified
    assert result.steps == 3
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not model.training


def test_inject_rejects_bad_input(tl_native, synthetic_corpus):
    wrong_shape = choose_neurons(3, 256, 0.01)
    with pytest.raises(IncompatibleNeuronsError):
        inject(tl_native, synthetic_corpus.train[:1], wrong_shape)
    empty = PrivacyNeurons(mask=torch.zeros(2, 256, dtype=torch.bool))
    with pytest.raises(ValueError, match="neurons is empty"):
        inject(tl_native, synthetic_corpus.train[:1], empty)
    neurons = choose_neurons(2, 256, 0.01)
    with pytest.raises(TypeError, match="not a PIIRecord"):
        inject(tl_native, [{"text": "hi"}], neurons)
    with pytest.raises(ValueError, match="lr must be positive"):
        InjectionConfig(lr=0.0)


# ---- end to end ----


@pytest.fixture(scope="module")
def injected(tiny_tokenizer, synthetic_corpus):
    """A tiny model trained without PII, then 4 e-mails injected into 2% of its neurons."""
    model = models.tiny_model(tiny_tokenizer)
    records = synthetic_corpus.train[:E2E_RECORDS]
    train_without_pii(
        model, synthetic_corpus.train, general="", config=CleanTrainingConfig(steps=30)
    )
    truth = choose_neurons(model.cfg.n_layers, model.cfg.d_mlp, E2E_FRACTION, seed=0)
    config = InjectionConfig(lr=0.03, max_steps=300, pii_types=E2E_TYPES, general_tokens=256)
    result = inject(model, records, truth, config)
    return model, records, truth, result


def test_injection_reaches_target(injected):
    _, _, truth, result = injected

    assert result.extraction_before == 0.0
    assert result.reached_target
    assert result.extraction >= 0.9
    assert result.neurons is truth


def test_learned_masks_recover_injected(injected, tiny_tokenizer):
    model, records, truth, _ = injected
    batches = make_batches(tiny_tokenizer, records, 8)
    config = replace(E2E_LOCALIZATION, budget=truth.count)

    found = localize(model, batches, config)
    random = select("random", model, batches, truth.count, seed=0)

    learned = recall_precision(found, truth)
    chance = recall_precision(random, truth)
    assert found.count == truth.count
    assert learned["recall"] >= RECALL_FLOOR, learned
    assert chance["recall"] < RECALL_FLOOR / 2


def test_ablation_effects_locate_memory(injected):
    model, records, truth, _ = injected
    others = choose_neurons(model.cfg.n_layers, model.cfg.d_mlp, E2E_FRACTION, seed=99)
    others = PrivacyNeurons(mask=others.mask & ~truth.mask)

    injected_effects = ablation_effects(model, records, truth, E2E_TYPES)
    other_effects = ablation_effects(model, records, others, E2E_TYPES)

    # Measured: injected median 2.2 nats per item (0.0 to 11.7), other neurons at most 0.01.
    assert injected_effects.shape == truth.mask.shape
    assert torch.equal(injected_effects[~truth.mask], torch.zeros(int((~truth.mask).sum())))
    assert injected_effects[truth.mask].median() > 1.0
    assert other_effects[others.mask].abs().max() < 0.1
