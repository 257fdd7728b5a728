"""Ground-truth benchmark for privacy-neuron localization: inject PII into known neurons.

The design follows the INJ benchmark of Chang, Thomason and Jia (NAACL 2024, "Do
Localization Methods Actually Localize Memorized Data in LLMs?"). A model that has not seen
some PII is fine-tuned on it with every weight frozen except those of a few randomly chosen
MLP neurons. Those are the neurons' rows of the input projection(s), their input-bias
entries and their columns of the output projection. The memorized PII can then live only in
those neurons, so a localization method is scored by how many of them it recovers (recall)
and how many of its picks are among them (precision).

The steps are :func:`choose_neurons`, :func:`inject`, then :func:`run_ground_truth`, which
runs the learned hard-concrete masks and the baselines of :mod:`tl_privacy.baselines` on
the injected model and scores them with :func:`recall_precision`.
:func:`train_without_pii` builds a base model for the tiny architecture that has seen the
records' text with the PII replaced by placeholders, but not the PII itself.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from tl_privacy.baselines import BASELINE_METHODS, BaselineConfig, select
from tl_privacy.data.records import PIIRecord
from tl_privacy.data.tokenization import (
    make_batches,
    pad_token_id,
    pii_items,
    tokenize_record,
    type_names_for,
)
from tl_privacy.extraction import exact_match_teacher_forced
from tl_privacy.hooks import (
    UnsupportedModelError,
    attached,
    check_model,
    eval_mode,
    mlp_post_name,
)
from tl_privacy.localization import LocalizationConfig, frozen, localize, restrict_to_types
from tl_privacy.metrics import perplexity, sequence_nll, text_windows
from tl_privacy.neurons import IncompatibleNeuronsError, PrivacyNeurons
from tl_privacy.objectives import keep_loss, reference_log_probs, shifted_targets
from tl_privacy.precision import autocast
from tl_privacy.redact import placeholder

logger = logging.getLogger("tl_privacy")

INJECTED = "injected"
LEARNED = "learned"
METHODS = (LEARNED, *BASELINE_METHODS)

# Module names of MLP projections, used only when d_model == d_mlp makes shapes ambiguous.
INPUT_PROJECTION_NAMES = ("fc_in", "in", "gate", "gate_proj", "up_proj", "c_fc", "fc1", "w1", "w3")
OUTPUT_PROJECTION_NAMES = ("fc_out", "out", "down_proj", "c_proj", "fc2", "w2")

# TransformerLens 3 HookedTransformer MLPs store raw parameters: name -> neuron axis.
HOOKED_INPUT_PARAMETERS = {"W_in": 1, "W_gate": 1, "b_in": 0}
HOOKED_OUTPUT_PARAMETERS = {"W_out": 0}

LossTokens = Literal["pii", "all"]

# Tokens per window of general text, BOS included: 128 for the text whose predictions inject
# keeps, 256 (the tl_privacy.metrics default) for measuring perplexity.
GENERAL_WINDOW = 128
PERPLEXITY_WINDOW = 256


# ---- parameter layout ----


@dataclass(frozen=True)
class NeuronSlices:
    """A parameter tensor with one slice per MLP neuron of one layer.

    Attributes:
        name: the parameter's name in ``model.named_parameters()``.
        parameter: the parameter itself.
        layer: the transformer block.
        axis: the tensor axis that indexes the layer's ``d_mlp`` neurons.
        role: ``"input"`` for the input projection(s) and their bias (the neuron's
            pre-activation), ``"output"`` for the output projection.
    """

    name: str
    parameter: nn.Parameter
    layer: int
    axis: int
    role: Literal["input", "output"]

    def neuron_mask(self, neurons: Bool[Tensor, " d_mlp"]) -> Bool[Tensor, "*shape"]:
        """Boolean tensor shaped like the parameter: True on the slices of ``neurons``."""
        shape = [1] * self.parameter.dim()
        shape[self.axis] = -1
        selected = neurons.to(self.parameter.device).view(shape)
        return selected.expand_as(self.parameter).contiguous()


def neuron_parameters(model: Any) -> list[NeuronSlices]:
    """Find, for every layer, the MLP parameters with one slice per neuron, and their axes.

    Supported layouts: ``nn.Linear`` (or Hugging Face ``Conv1D``) projections inside
    ``model.blocks[L].mlp``, which covers TransformerLens 4 ``TransformerBridge`` models
    (TL-native ``in``/``out`` and Hugging Face ``gate_proj``/``up_proj``/``down_proj``,
    ``c_fc``/``c_proj``, ...), and the raw ``W_in``/``W_gate``/``b_in``/``W_out`` parameters
    of a TransformerLens 3 ``HookedTransformer``. The output projection's bias has no
    per-neuron slice and is not returned.

    Raises:
        UnsupportedModelError: for any other layout, naming what was found.
    """
    n_layers, d_mlp = check_model(model)
    d_model = int(model.cfg.d_model)
    names = {}
    for name, parameter in model.named_parameters():
        names.setdefault(id(parameter), name)

    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) != n_layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no model.blocks list of {n_layers} blocks; inject "
            "needs each block's MLP module to find the neuron weights."
        )

    slices: list[NeuronSlices] = []
    for layer in range(n_layers):
        mlp = blocks[layer].mlp
        if _is_hooked_mlp(mlp):
            found = _hooked_slices(mlp, layer, names)
        else:
            found = _linear_slices(mlp, layer, d_model, d_mlp, names)
        _check_layer_layout(model, layer, found)
        slices.extend(found)
    return slices


def _is_hooked_mlp(mlp: nn.Module) -> bool:
    return isinstance(getattr(mlp, "W_in", None), nn.Parameter)


def _hooked_slices(mlp: nn.Module, layer: int, names: dict[int, str]) -> list[NeuronSlices]:
    # NOTE: not run in the tests, because TransformerLens 4.3 no longer ships
    # HookedTransformer. verify_neuron_axes checks these axes whenever inject runs.
    found = []
    axes = {**HOOKED_INPUT_PARAMETERS, **HOOKED_OUTPUT_PARAMETERS}
    for attribute, axis in axes.items():
        parameter = getattr(mlp, attribute, None)
        if not isinstance(parameter, nn.Parameter):
            continue
        role = "output" if attribute in HOOKED_OUTPUT_PARAMETERS else "input"
        found.append(NeuronSlices(names[id(parameter)], parameter, layer, axis, role))
    return found


def _linear_slices(
    mlp: nn.Module, layer: int, d_model: int, d_mlp: int, names: dict[int, str]
) -> list[NeuronSlices]:
    found = []
    seen: set[int] = set()
    for module_name, module in mlp.named_modules():
        weight = _projection_weight(module)
        if weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        # nn.Linear stores [out_features, in_features]; Conv1D stores [in, out].
        out_axis = 0 if isinstance(module, nn.Linear) else 1
        in_axis = 1 - out_axis
        role = _projection_role(module_name, weight, out_axis, in_axis, d_model, d_mlp, layer)
        axis = out_axis if role == "input" else in_axis
        found.append(NeuronSlices(names[id(weight)], weight, layer, axis, role))

        bias = getattr(module, "bias", None)
        if role == "input" and isinstance(bias, nn.Parameter):
            found.append(NeuronSlices(names[id(bias)], bias, layer, 0, "input"))
    return found


def _projection_weight(module: nn.Module) -> nn.Parameter | None:
    if isinstance(module, nn.Linear):
        return module.weight
    # transformers' Conv1D (GPT-2 family) is a transposed linear layer.
    if type(module).__name__ == "Conv1D" and isinstance(
        getattr(module, "weight", None), nn.Parameter
    ):
        return module.weight
    return None


def _projection_role(
    module_name: str,
    weight: Tensor,
    out_axis: int,
    in_axis: int,
    d_model: int,
    d_mlp: int,
    layer: int,
) -> Literal["input", "output"]:
    shape = (weight.shape[out_axis], weight.shape[in_axis])
    if d_model != d_mlp and shape == (d_mlp, d_model):
        return "input"
    if d_model != d_mlp and shape == (d_model, d_mlp):
        return "output"

    # TransformerLens bridges wrap each module as "<name>._original_component".
    parts = [part for part in module_name.split(".") if part and part != "_original_component"]
    leaf = parts[-1] if parts else ""
    if shape == (d_mlp, d_model) and leaf in INPUT_PROJECTION_NAMES:
        return "input"
    if shape == (d_model, d_mlp) and leaf in OUTPUT_PROJECTION_NAMES:
        return "output"
    raise UnsupportedModelError(
        f"layer {layer}: the MLP contains a projection {module_name!r} of weight shape "
        f"{tuple(weight.shape)} that is neither an input projection (d_model={d_model} -> "
        f"d_mlp={d_mlp}) nor the output projection; inject supports MLPs made of "
        "input projection(s), an activation and one output projection."
    )


def _check_layer_layout(model: Any, layer: int, found: list[NeuronSlices]) -> None:
    weights = [s for s in found if s.parameter.dim() == 2]
    inputs = [s.name for s in weights if s.role == "input"]
    outputs = [s.name for s in weights if s.role == "output"]
    gated = bool(getattr(model.cfg, "gated_mlp", False))
    expected_inputs = 2 if gated else 1
    if len(inputs) != expected_inputs or len(outputs) != 1:
        raise UnsupportedModelError(
            f"layer {layer}: expected {expected_inputs} input projection(s) "
            f"({'gated' if gated else 'ungated'} MLP) and 1 output projection, found inputs "
            f"{inputs} and outputs {outputs}; this MLP layout is not supported by inject."
        )


def verify_neuron_axes(model: Any, slices: Sequence[NeuronSlices] | None = None) -> None:
    """Check on a short input that each layer's slices really belong to one neuron.

    In every layer, the neuron with the largest mean ``|hook_post|`` on 8 probe tokens is
    checked. Zeroing its input slices must change its own ``hook_post`` activation and no
    other neuron's of that layer. Zeroing its output slice must give the same logits as
    zero-ablating its ``hook_post``. The weights are restored exactly after each check.

    Raises:
        UnsupportedModelError: naming the layer and parameters that failed.
    """
    slices = list(slices) if slices is not None else neuron_parameters(model)
    n_layers, d_mlp = check_model(model)
    for item in slices:
        if item.parameter.shape[item.axis] != d_mlp:
            raise UnsupportedModelError(
                f"{item.name} has {item.parameter.shape[item.axis]} entries along axis "
                f"{item.axis}, but the model has d_mlp={d_mlp}; that axis is not the neuron axis."
            )
    tokens = _probe_tokens(model)

    with torch.no_grad(), eval_mode(model):
        clean_logits = _logits(model, tokens)
        for layer in range(n_layers):
            clean = _post_activations(model, tokens, layer)
            neuron = int(clean.abs().mean(dim=(0, 1)).argmax())
            layer_slices = [s for s in slices if s.layer == layer]
            _verify_input_axis(model, tokens, layer, neuron, layer_slices, clean)
            _verify_output_axis(model, tokens, layer, neuron, layer_slices, clean_logits)


def _probe_tokens(model: Any) -> Int[Tensor, "1 pos"]:
    vocab = int(model.cfg.d_vocab)
    ids = [(17 * index + 5) % vocab for index in range(8)]
    device = next(iter(model.parameters())).device
    return torch.tensor([ids], device=device)


def _logits(model: Any, tokens: Tensor) -> Float[Tensor, "1 pos d_vocab"]:
    return model(tokens, return_type="logits").float()


def _post_activations(model: Any, tokens: Tensor, layer: int) -> Float[Tensor, "1 pos d_mlp"]:
    stored: dict[str, Tensor] = {}

    def store(activation: Tensor, hook: Any) -> Tensor:
        stored["value"] = activation.detach().float().clone()
        return activation

    with attached(model, [(mlp_post_name(layer), store)]):
        model(tokens, return_type="logits")
    return stored["value"]


@contextmanager
def _zeroed(slices: Sequence[NeuronSlices], neuron: int) -> Iterator[None]:
    """Zero the slices of one neuron (call under no_grad) and restore the old values after."""
    saved = []
    for item in slices:
        index = torch.tensor([neuron], device=item.parameter.device)
        saved.append((item, index, item.parameter.index_select(item.axis, index).clone()))
        item.parameter.index_fill_(item.axis, index, 0.0)
    try:
        yield
    finally:
        for item, index, values in saved:
            item.parameter.index_copy_(item.axis, index, values)


def _verify_input_axis(
    model: Any,
    tokens: Tensor,
    layer: int,
    neuron: int,
    slices: list[NeuronSlices],
    clean: Tensor,
) -> None:
    inputs = [s for s in slices if s.role == "input"]
    with _zeroed(inputs, neuron):
        zeroed = _post_activations(model, tokens, layer)

    # A tolerance rather than exact equality, because a device may round the unchanged
    # neurons' matrix products differently when one row of the weights changes.
    tolerance = 1e-5 * float(clean.abs().max())
    changed = ((zeroed - clean).abs() > tolerance).flatten(0, 1).any(dim=0)
    changed_neurons = changed.nonzero().flatten().tolist()
    if changed_neurons != [neuron]:
        raise UnsupportedModelError(
            f"layer {layer}: zeroing neuron {neuron}'s slices of {[s.name for s in inputs]} "
            f"changed hook_post at neurons {changed_neurons[:10]}, expected only [{neuron}]. "
            "The neuron axis of these parameters is not the one inject assumed."
        )


def _verify_output_axis(
    model: Any,
    tokens: Tensor,
    layer: int,
    neuron: int,
    slices: list[NeuronSlices],
    clean_logits: Tensor,
) -> None:
    outputs = [s for s in slices if s.role == "output"]
    selected = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp, dtype=torch.bool)
    selected[layer, neuron] = True
    with attached(model, PrivacyNeurons(mask=selected).ablation_hooks()):
        ablated = _logits(model, tokens)
    with _zeroed(outputs, neuron):
        zeroed = _logits(model, tokens)

    scale = float(clean_logits.abs().max()) + 1e-6
    matches = torch.allclose(zeroed, ablated, rtol=1e-4, atol=1e-4 * scale)
    if not matches or torch.equal(zeroed, clean_logits):
        raise UnsupportedModelError(
            f"layer {layer}: zeroing neuron {neuron}'s slice of {[s.name for s in outputs]} "
            "does not act like zero-ablating its hook_post activation. The neuron axis of "
            "the output projection is not the one inject assumed."
        )


# ---- choosing the neurons ----


def choose_neurons(n_layers: int, d_mlp: int, fraction: float, seed: int = 0) -> PrivacyNeurons:
    """Choose the same number of random neurons in every layer, to inject data into.

    Each layer gets ``max(1, round(fraction * d_mlp))`` neurons, drawn without
    replacement from a generator seeded with ``seed`` (layer ``L`` uses ``seed + L``).

    Returns:
        A :class:`PrivacyNeurons` with method ``"injected"`` and mask ``[n_layers, d_mlp]``.
    """
    if n_layers < 1 or d_mlp < 1:
        raise ValueError(f"n_layers and d_mlp must be at least 1, got {n_layers} and {d_mlp}.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}; 0.01 is 1% per layer.")

    per_layer = max(1, round(fraction * d_mlp))
    mask = torch.zeros(n_layers, d_mlp, dtype=torch.bool)
    for layer in range(n_layers):
        generator = torch.Generator().manual_seed(seed + layer)
        mask[layer, torch.randperm(d_mlp, generator=generator)[:per_layer]] = True
    config = {"fraction": fraction, "per_layer": per_layer, "seed": seed}
    return PrivacyNeurons(mask=mask, method=INJECTED, config=config)


# ---- injection ----


@dataclass(frozen=True)
class InjectionConfig:
    """Settings of :func:`inject`.

    Attributes:
        lr: Adam learning rate of the chosen neurons' weights (no weight decay, which
            would move the frozen weights too).
        max_steps: maximum number of optimizer steps.
        batch_size: records per step.
        eval_every: steps between two measurements of exact extraction.
        target_extraction: stop once this fraction of the PII items is extracted exactly
            (teacher-forced exact match, the same as greedy decoding up to logit ties).
        loss_tokens: ``"pii"`` trains the cross-entropy of the PII tokens only, so the
            neurons store the PII and not the records' wording. ``"all"`` trains every
            real token.
        keep_weight: weight of the KL divergence from the model before injection to the
            model being trained, on the records' other real tokens and on general text.
            It keeps the neurons from changing predictions other than the PII. Without it,
            training the PII tokens also shifts the other predictions, so a localizer that
            preserves those is right to leave the neurons alone. The records' tokens are
            kept only with ``loss_tokens="pii"``, the general text always.
        general_tokens: tokens of :func:`tl_privacy.data.general_text` whose predictions
            the KL term also keeps, in windows of at most 128 tokens; 0 for none. Each
            step then adds a forward pass over one batch of windows.
        pii_types: PII types to inject, or None for all.
        precision: ``"bfloat16"``, ``"float32"`` or ``"auto"``, as in
            :class:`tl_privacy.memorize.MemorizeConfig`.
        seed: seed of the record order.
        verify_axes: run :func:`verify_neuron_axes` before training.
        show_progress: show a tqdm bar.
    """

    lr: float = 1e-2
    max_steps: int = 500
    batch_size: int = 8
    eval_every: int = 10
    target_extraction: float = 0.9
    loss_tokens: LossTokens = "pii"
    keep_weight: float = 1.0
    general_tokens: int = 2048
    pii_types: tuple[str, ...] | None = None
    precision: str = "float32"
    seed: int = 0
    verify_axes: bool = True
    show_progress: bool = False

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}.")
        for name in ("max_steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}.")
        if not 0.0 < self.target_extraction <= 1.0:
            raise ValueError(
                f"target_extraction must be in (0, 1], got {self.target_extraction!r}."
            )
        if self.loss_tokens not in ("pii", "all"):
            raise ValueError(f"loss_tokens must be 'pii' or 'all', got {self.loss_tokens!r}.")
        if self.general_tokens < 0:
            raise ValueError(f"general_tokens must be >= 0, got {self.general_tokens!r}.")
        if self.keep_weight < 0:
            raise ValueError(f"keep_weight must be >= 0, got {self.keep_weight!r}.")
        if self.pii_types is not None:
            object.__setattr__(self, "pii_types", tuple(self.pii_types))


@dataclass
class InjectionResult:
    """Summary of :func:`inject`.

    Attributes:
        neurons: the neurons whose weights were trained (the ground truth).
        steps: optimizer steps taken.
        extraction_before: teacher-forced exact extraction of the PII items before training.
        extraction: the same after training.
        reached_target: whether ``extraction >= target_extraction``.
        n_items: number of PII items measured.
        trainable_entries: number of weight entries that could change.
        frozen_verified: every parameter entry outside the neurons' slices was compared
            bit for bit after training and found unchanged (inject raises otherwise).
        wall_time_s: seconds of training and measurement.
        loss_curve: loss of every step (nats per trained token).
        extraction_curve: ``(step, extraction)`` pairs of every measurement.
    """

    neurons: PrivacyNeurons
    steps: int
    extraction_before: float
    extraction: float
    reached_target: bool
    n_items: int
    trainable_entries: int
    frozen_verified: bool
    wall_time_s: float
    loss_curve: list[float] = field(default_factory=list)
    extraction_curve: list[tuple[int, float]] = field(default_factory=list)


def inject(
    model: Any,
    records: Sequence[PIIRecord],
    neurons: PrivacyNeurons,
    config: InjectionConfig | None = None,
) -> InjectionResult:
    """Fine-tune only the weights of ``neurons`` until the model extracts the records' PII.

    The trained entries are each chosen neuron's rows of the input projection(s) (gate
    and up for gated MLPs), its input-bias entries and its column of the output
    projection. Gradient hooks zero the gradient of every other entry of those
    parameters, and all other parameters have ``requires_grad`` off. Adam without weight
    decay then leaves them exactly as they were, which is checked bit for bit after
    training.

    Args:
        model: a TransformerLens model with a tokenizer (see :func:`neuron_parameters`).
        records: the PII records to inject; they are tokenized with ``model.tokenizer``.
        neurons: the ``[n_layers, d_mlp]`` set to train, e.g. from :func:`choose_neurons`.
        config: settings; defaults to :class:`InjectionConfig()`.

    Returns:
        The summary; the model is changed in place and left in eval mode, with its
        ``requires_grad`` flags as before.

    Raises:
        UnsupportedModelError: for an MLP layout that :func:`neuron_parameters` rejects.
        RuntimeError: if a weight outside the neurons changed (a bug, not a setting).
    """
    config = config or InjectionConfig()
    started = time.perf_counter()
    neurons.check_compatible(model)
    if neurons.count == 0:
        raise ValueError("neurons is empty; choose at least one neuron with choose_neurons().")
    tokenizer = _tokenizer(model)
    records = _check_records(records)

    slices = neuron_parameters(model)
    if config.verify_axes:
        verify_neuron_axes(model, slices)
    batches = _injection_batches(tokenizer, records, config)
    general = _general_batches(model, tokenizer, config)
    items = pii_items(tokenizer, records, types=config.pii_types)
    if not items:
        raise ValueError(
            f"the {len(records)} records have no PII spans"
            + (f" of types {list(config.pii_types)}" if config.pii_types else "")
            + " to inject; label the records first."
        )

    masks = {s.name: s.neuron_mask(neurons.mask[s.layer]) for s in slices}
    trained = [s for s in slices if masks[s.name].any()]
    snapshot = _Snapshot(model, trained)
    extraction_before = _extraction(model, items)

    with frozen(model), _gradient_masks(trained, masks):
        loss_curve, extraction_curve = _train(model, batches, general, items, trained, config)
    model.eval()

    snapshot.verify(model, masks)
    extraction = extraction_curve[-1][1]
    result = InjectionResult(
        neurons=neurons,
        steps=len(loss_curve),
        extraction_before=extraction_before,
        extraction=extraction,
        reached_target=extraction >= config.target_extraction,
        n_items=len(items),
        trainable_entries=sum(int(masks[s.name].sum()) for s in trained),
        frozen_verified=True,
        wall_time_s=time.perf_counter() - started,
        loss_curve=loss_curve,
        extraction_curve=extraction_curve,
    )
    logger.info(
        "injected %d items into %d neurons in %d steps (%.1f s): extraction %.2f -> %.2f",
        result.n_items,
        neurons.count,
        result.steps,
        result.wall_time_s,
        extraction_before,
        extraction,
    )
    return result


def _tokenizer(model: Any) -> Any:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"{type(model).__name__} has no tokenizer; boot the model with one, because the "
            "records are tokenized with model.tokenizer."
        )
    return tokenizer


def _check_records(records: Sequence[PIIRecord]) -> list[PIIRecord]:
    records = list(records)
    if not records:
        raise ValueError("no records given; inject needs at least one PIIRecord.")
    for index, record in enumerate(records):
        if not isinstance(record, PIIRecord):
            raise TypeError(
                f"record {index} is a {type(record).__name__}, not a PIIRecord; convert dicts "
                "or files with tl_privacy.data.load_records()."
            )
    return records


def _injection_batches(
    tokenizer: Any, records: list[PIIRecord], config: InjectionConfig
) -> list[dict[str, Tensor]]:
    type_names = type_names_for(records)
    batches = make_batches(
        tokenizer, records, config.batch_size, shuffle=True, seed=config.seed, type_names=type_names
    )
    return restrict_to_types(batches, config.pii_types, type_names)


def _extraction(model: Any, items: list) -> float:
    # Counted in Python, since a float32 mean turns 9/10 into 0.8999999 < 0.9.
    return int(exact_match_teacher_forced(model, items).sum()) / len(items)


@contextmanager
def _gradient_masks(slices: list[NeuronSlices], masks: dict[str, Tensor]) -> Iterator[None]:
    """Let only the neurons' slices receive gradient; ``frozen`` restores the flags after."""
    handles = []
    for item in slices:
        mask = masks[item.name]
        item.parameter.requires_grad_(True)
        # torch.where rather than a product, so a NaN gradient outside the mask cannot leak in.
        handles.append(
            item.parameter.register_hook(lambda grad, mask=mask: torch.where(mask, grad, 0.0))
        )
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _train(
    model: Any,
    batches: list[dict[str, Tensor]],
    general: list[dict[str, Tensor]],
    items: list,
    slices: list[NeuronSlices],
    config: InjectionConfig,
) -> tuple[list[float], list[tuple[int, float]]]:
    parameters = list({id(s.parameter): s.parameter for s in slices}.values())
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=0.0)
    device = parameters[0].device
    batches = [_to_device(batch, device) for batch in batches]
    general = [_to_device(batch, device) for batch in general]
    keep_records = config.loss_tokens == "pii" and config.keep_weight > 0
    record_references = _references(model, batches, config) if keep_records else None
    general_references = _references(model, general, config) if config.keep_weight > 0 else None
    loss_curve: list[float] = []
    extraction_curve: list[tuple[int, float]] = []

    progress = tqdm(total=config.max_steps, desc="inject", disable=not config.show_progress)
    for step in range(1, config.max_steps + 1):
        index = (step - 1) % len(batches)
        batch = batches[index]
        with autocast(model, config.precision):
            logits = _forward(model, batch)
        loss = _injection_loss(logits, batch, config.loss_tokens)
        if record_references is not None:
            keep_term = keep_loss(logits, batch, "kl", record_references[index])
            loss = loss + config.keep_weight * keep_term
        if general and general_references is not None:
            index = (step - 1) % len(general)
            with autocast(model, config.precision):
                general_logits = _forward(model, general[index])
            keep_term = keep_loss(general_logits, general[index], "kl", general_references[index])
            loss = loss + config.keep_weight * keep_term

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_curve.append(float(loss.detach()))
        progress.update(1)
        progress.set_postfix(loss=f"{loss_curve[-1]:.3f}")

        if step % config.eval_every == 0 or step == config.max_steps:
            extraction = _extraction(model, items)
            extraction_curve.append((step, extraction))
            if extraction >= config.target_extraction:
                break
    progress.close()
    optimizer.zero_grad(set_to_none=True)
    return loss_curve, extraction_curve


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def _forward(model: Any, batch: dict[str, Tensor]) -> Float[Tensor, "batch pos d_vocab"]:
    return model(batch["input_ids"], attention_mask=batch["attention_mask"], return_type="logits")


def _references(
    model: Any, batches: list[dict[str, Tensor]], config: InjectionConfig
) -> list[Tensor]:
    """Log-probabilities of the model before injection at each batch's keep positions.

    Stored in float16, ``keep tokens x d_vocab x 2`` bytes in all: about 200 MB for
    SmolLM2's 49,152-token vocabulary and 2,048 general-text tokens.
    """
    references = []
    with torch.no_grad(), autocast(model, config.precision):
        for batch in batches:
            logits = _forward(model, batch)
            references.append(reference_log_probs(logits, batch).to(torch.float16))
    return references


def _general_batches(
    model: Any, tokenizer: Any, config: InjectionConfig
) -> list[dict[str, Tensor]]:
    """Cut the first ``config.general_tokens`` tokens of the general text into keep-only batches."""
    if config.general_tokens == 0 or config.keep_weight == 0:
        return []
    window = min(GENERAL_WINDOW, int(model.cfg.n_ctx))
    windows = text_windows(tokenizer, window=window, max_tokens=config.general_tokens)
    batches = []
    for first in range(0, len(windows), config.batch_size):
        input_ids, attention_mask = _right_pad(
            windows[first : first + config.batch_size], pad_token_id(tokenizer)
        )
        pii_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        batches.append(
            {"input_ids": input_ids, "attention_mask": attention_mask, "pii_mask": pii_mask}
        )
    return batches


def _injection_loss(
    logits: Float[Tensor, "batch pos d_vocab"], batch: dict[str, Tensor], tokens: LossTokens
) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy (nats) over the PII tokens, or over all real tokens."""
    targets, pii, keep = shifted_targets(batch)
    selected = pii if tokens == "pii" else pii | keep
    if not selected.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1][selected].float(), targets[selected])


class _Snapshot:
    """Copies of the trained parameters and a SHA-256 digest of all other parameters."""

    def __init__(self, model: Any, trained: list[NeuronSlices]) -> None:
        self.trained_ids = {id(s.parameter) for s in trained}
        self.copies = {s.name: s.parameter.detach().clone() for s in trained}
        self.digest = _digest(self._others(model))

    def _others(self, model: Any) -> list[tuple[str, Tensor]]:
        seen = set(self.trained_ids)
        others = []
        for name, parameter in model.named_parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                others.append((name, parameter))
        return others

    def verify(self, model: Any, masks: dict[str, Tensor]) -> None:
        """Raise ``RuntimeError`` unless every entry outside the masks is bit-for-bit unchanged."""
        named = dict(model.named_parameters())
        for name, before in self.copies.items():
            after = named[name].detach()
            outside = ~masks[name]
            if not torch.equal(_bits(after)[outside], _bits(before)[outside]):
                raise RuntimeError(
                    f"parameter {name} changed outside the injected neurons; the gradient masks "
                    "failed, so the injected model is not a valid ground truth."
                )
        if _digest(self._others(model)) != self.digest:
            raise RuntimeError(
                "a parameter outside the injected neurons' MLP weights changed during inject; "
                "the injected model is not a valid ground truth."
            )


def _bits(tensor: Tensor) -> Tensor:
    """Reinterpret the tensor's bits as integers, so that -0.0 and NaN payloads compare exactly."""
    integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.contiguous().view(integer[tensor.element_size()])


def _digest(named: list[tuple[str, Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, parameter in named:
        tensor = parameter.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ---- scoring ----


def recall_precision(found: PrivacyNeurons, truth: PrivacyNeurons) -> dict[str, Any]:
    """Score a found set against the injected one.

    Returns:
        ``recall`` (found and injected / injected), ``precision`` (found and injected /
        found; NaN when nothing was found), ``true_positives``, ``found``, ``truth``, and
        ``recall_by_layer`` (a list with NaN for layers without injected neurons).
    """
    if found.mask.shape != truth.mask.shape:
        raise IncompatibleNeuronsError(
            f"found has shape {tuple(found.mask.shape)} but truth has {tuple(truth.mask.shape)}; "
            "score sets found on the injected model itself."
        )
    if truth.count == 0:
        raise ValueError("truth is empty; recall is undefined without injected neurons.")

    hits = found.mask & truth.mask
    true_positives = int(hits.sum())
    by_layer = []
    for layer in range(truth.n_layers):
        injected = int(truth.mask[layer].sum())
        by_layer.append(int(hits[layer].sum()) / injected if injected else math.nan)
    return {
        "recall": true_positives / truth.count,
        "precision": true_positives / found.count if found.count else math.nan,
        "true_positives": true_positives,
        "found": found.count,
        "truth": truth.count,
        "recall_by_layer": by_layer,
    }


def ablation_effects(
    model: Any,
    records: Sequence[PIIRecord],
    neurons: PrivacyNeurons,
    pii_types: tuple[str, ...] | None = None,
) -> Float[Tensor, "n_layers d_mlp"]:
    """Measure how much each neuron of the set alone carries the records' PII.

    For every selected neuron, the neuron alone is zero-ablated and the mean
    negative log-likelihood of the PII items' target tokens given their prefixes is
    compared with the unablated one. An injected neuron with an effect near 0 took up
    none of the memory, so no method can be expected to find it from the PII's
    behaviour. A GELU neuron whose pre-activation stays far below 0 on the records, for
    example, gets almost no gradient during injection.

    Returns:
        The rise of the NLL in nats per PII item, ``[n_layers, d_mlp]``, 0 outside the
        set. One pass over the items per selected neuron.
    """
    neurons.check_compatible(model)
    items = pii_items(_tokenizer(model), _check_records(records), types=pii_types)
    if not items:
        raise ValueError(f"the records have no PII items of types {pii_types} to measure.")
    sequences = [torch.cat([item.prefix_ids, item.target_ids]) for item in items]

    def item_nll(hooks: list) -> float:
        losses = sequence_nll(model, sequences, fwd_hooks=hooks)
        total = 0.0
        for loss, item in zip(losses, items, strict=True):
            # The last len(target) losses of each sequence are those of the PII tokens.
            total += float(loss[-len(item.target_ids) :].sum())
        return total / len(items)

    clean = item_nll([])
    effects = torch.zeros(neurons.mask.shape)
    for layer, neuron in neurons.indices():
        single = torch.zeros_like(neurons.mask)
        single[layer, neuron] = True
        effects[layer, neuron] = item_nll(PrivacyNeurons(mask=single).ablation_hooks()) - clean
    return effects


# ---- the benchmark runner ----


@dataclass(frozen=True)
class GroundTruthConfig:
    """Settings of :func:`run_ground_truth`.

    Attributes:
        methods: ``"learned"`` (hard-concrete masks, :func:`tl_privacy.localize`) and any
            of ``tl_privacy.baselines.BASELINE_METHODS``.
        budget_factors: each method selects ``max(1, round(factor * injected count))``
            neurons.
        localization: settings of the learned masks; ``budget`` and ``selection`` are
            replaced by the budget and ``"budget"``, so exactly that many are selected.
        baseline: settings of the baselines.
        jaccard_seeds: gate-noise seeds of the learned masks at the injected budget, whose
            sets are compared pairwise; fewer than two skips the comparison.
        general_skip_tokens: tokens at the start of the general text left out of the
            perplexity, because :func:`inject` kept the model's predictions on them
            (``InjectionConfig.general_tokens``).
        perplexity_tokens: general-text tokens after the skipped ones to measure
            perplexity on (None: all the rest).
        seed: seed of the random baseline.
    """

    methods: tuple[str, ...] = METHODS
    budget_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    localization: LocalizationConfig = field(
        default_factory=lambda: LocalizationConfig(show_progress=False)
    )
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    jaccard_seeds: tuple[int, ...] = (0, 1, 2)
    general_skip_tokens: int = 2048
    perplexity_tokens: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}.")
        if not self.budget_factors or any(not f > 0 for f in self.budget_factors):
            raise ValueError(
                f"budget_factors must be positive numbers, got {self.budget_factors!r}."
            )
        if self.general_skip_tokens < 0:
            raise ValueError(f"general_skip_tokens must be >= 0, got {self.general_skip_tokens!r}.")


@dataclass
class MethodScore:
    """One method at one budget on one injected model.

    ``active_recall`` is the recall of the injected neurons that carry the memory (the
    ``active`` set given to :func:`run_ground_truth`, None without one).
    ``extraction_ablated`` is the teacher-forced exact extraction of the injected PII
    items with the set zero-ablated. The perplexity changes are relative (0.05 = 5%
    higher than without ablation), on general text and on held-out records (None when
    none were given). Wall time and passes are the method's own, without the scoring.
    """

    method: str
    budget_factor: float
    k: int
    recall: float
    precision: float
    recall_by_layer: list[float]
    active_recall: float | None
    extraction_ablated: float
    perplexity_change: float
    heldout_perplexity_change: float | None
    wall_time_s: float
    forward_passes: int
    backward_passes: int


@dataclass
class GroundTruthResult:
    """Scores of every method on one injected model.

    Attributes:
        truth_count: number of injected neurons.
        extraction_clean: extraction of the injected items without ablation.
        perplexity_clean: general-text perplexity without ablation.
        heldout_perplexity_clean: held-out record perplexity without ablation, or None.
        scores: one row per method and budget, after an ``"injected"`` row that ablates
            the injected set itself (what a perfect method would find).
        jaccard: pairwise Jaccard overlaps of the learned sets of ``jaccard_seeds``.
        seed_recalls: recall of each of those sets.
    """

    truth_count: int
    extraction_clean: float
    perplexity_clean: float
    heldout_perplexity_clean: float | None
    scores: list[MethodScore]
    jaccard: list[float] = field(default_factory=list)
    seed_recalls: list[float] = field(default_factory=list)

    def score(self, method: str, budget_factor: float = 1.0) -> MethodScore:
        """Return the row of ``method`` at ``budget_factor``."""
        for row in self.scores:
            if row.method == method and row.budget_factor == budget_factor:
                return row
        raise KeyError(f"no score for method {method!r} at budget factor {budget_factor}.")

    def to_dict(self) -> dict[str, Any]:
        """Return the result as nested dicts and lists of JSON values."""
        return asdict(self)


def run_ground_truth(
    model: Any,
    records: Sequence[PIIRecord],
    truth: PrivacyNeurons,
    config: GroundTruthConfig | None = None,
    *,
    pii_types: tuple[str, ...] | None = None,
    heldout: Sequence[PIIRecord] = (),
    active: PrivacyNeurons | None = None,
) -> GroundTruthResult:
    """Localize the injected PII with every method and score the sets against ``truth``.

    Args:
        model: the model after :func:`inject`.
        records: the injected records; localization runs on them and extraction is
            measured on their PII items.
        truth: the injected neurons.
        config: settings; defaults to :class:`GroundTruthConfig()`.
        pii_types: the injected PII types (``InjectionConfig.pii_types``), or None for all.
        heldout: records the model was not trained on, for the held-out perplexity.
        active: the injected neurons that took up the memory, e.g. those with a large
            :func:`ablation_effects`; scored as ``active_recall``.
    """
    config = config or GroundTruthConfig()
    records = _check_records(records)
    truth.check_compatible(model)
    tokenizer = _tokenizer(model)
    type_names = type_names_for(records)
    localization = replace(
        config.localization, selection="budget", pii_types=pii_types, type_names=type_names
    )
    baseline = replace(config.baseline, pii_types=pii_types, type_names=type_names)
    batches = make_batches(tokenizer, records, localization.batch_size, type_names=type_names)
    evaluate = _Evaluator(model, tokenizer, records, truth, active, config, pii_types, heldout)

    scores = [evaluate(truth, INJECTED, 1.0)]
    learned_at_budget: dict[int, PrivacyNeurons] = {}
    for factor in config.budget_factors:
        k = max(1, round(factor * truth.count))
        for method in config.methods:
            if method == LEARNED:
                found = localize(model, batches, replace(localization, budget=k))
                if k == truth.count:
                    learned_at_budget[localization.seed] = found
            else:
                found = select(method, model, batches, k, seed=config.seed, config=baseline)
            scores.append(evaluate(found, method, factor))
            logger.info("%s at %gx budget (%d): recall %.2f", method, factor, k, scores[-1].recall)

    jaccard, seed_recalls = _seed_overlap(
        model, batches, localization, truth, config.jaccard_seeds, learned_at_budget
    )
    return GroundTruthResult(
        truth_count=truth.count,
        extraction_clean=evaluate.extraction_clean,
        perplexity_clean=evaluate.perplexity_clean,
        heldout_perplexity_clean=evaluate.heldout_clean,
        scores=scores,
        jaccard=jaccard,
        seed_recalls=seed_recalls,
    )


class _Evaluator:
    """Scores sets on one injected model. The unablated values are measured once."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        records: list[PIIRecord],
        truth: PrivacyNeurons,
        active: PrivacyNeurons | None,
        config: GroundTruthConfig,
        pii_types: tuple[str, ...] | None,
        heldout: Sequence[PIIRecord],
    ) -> None:
        self.model = model
        self.truth = truth
        self.active = active if active is not None and active.count else None
        self.items = pii_items(tokenizer, records, types=pii_types)
        if not self.items:
            raise ValueError(
                f"the records have no PII items of types {pii_types}; pass the types inject used."
            )
        self.general = general_windows(
            model, tokenizer, config.general_skip_tokens, config.perplexity_tokens
        )
        heldout = _check_records(heldout) if heldout else []
        self.heldout = [tokenize_record(tokenizer, record).input_ids for record in heldout]
        self.extraction_clean = self.extraction([])
        self.perplexity_clean = perplexity(model, self.general)
        self.heldout_clean = perplexity(model, self.heldout) if self.heldout else None

    def extraction(self, hooks: list) -> float:
        exact = exact_match_teacher_forced(self.model, self.items, fwd_hooks=hooks)
        return int(exact.sum()) / len(self.items)

    def __call__(self, found: PrivacyNeurons, method: str, factor: float) -> MethodScore:
        hooks = found.ablation_hooks()
        scores = recall_precision(found, self.truth)
        general = perplexity(self.model, self.general, fwd_hooks=hooks)
        heldout_change = None
        if self.heldout_clean is not None:
            heldout = perplexity(self.model, self.heldout, fwd_hooks=hooks)
            heldout_change = heldout / self.heldout_clean - 1.0
        return MethodScore(
            method=method,
            budget_factor=factor,
            k=found.count,
            recall=scores["recall"],
            active_recall=None
            if self.active is None
            else recall_precision(found, self.active)["recall"],
            precision=scores["precision"],
            recall_by_layer=scores["recall_by_layer"],
            extraction_ablated=self.extraction(hooks),
            perplexity_change=general / self.perplexity_clean - 1.0,
            heldout_perplexity_change=heldout_change,
            wall_time_s=float(found.stats.get("wall_time_s", 0.0)),
            forward_passes=int(found.stats.get("forward_passes", 0)),
            backward_passes=int(found.stats.get("backward_passes", 0)),
        )


def general_windows(
    model: Any, tokenizer: Any, skip_tokens: int = 0, max_tokens: int | None = None
) -> list[Int[Tensor, " pos"]]:
    """Windows of :func:`tl_privacy.data.general_text` after its first ``skip_tokens`` tokens.

    Each window is BOS and up to ``min(256, n_ctx) - 1`` text tokens. ``max_tokens`` keeps
    enough windows for about that many tokens (None: all the rest). ``skip_tokens`` is
    rounded up to whole windows, so text that :func:`inject` kept
    (``InjectionConfig.general_tokens``) is left out.
    """
    window = min(PERPLEXITY_WINDOW, int(model.cfg.n_ctx))
    windows = text_windows(tokenizer, window=window)
    windows = windows[math.ceil(skip_tokens / (window - 1)) :]
    if max_tokens is not None:
        windows = windows[: max(1, math.ceil(max_tokens / (window - 1)))]
    if not windows:
        raise ValueError(
            f"skipping {skip_tokens} tokens leaves no general text to measure perplexity on; "
            "skip fewer."
        )
    return windows


def _seed_overlap(
    model: Any,
    batches: list[dict[str, Tensor]],
    localization: LocalizationConfig,
    truth: PrivacyNeurons,
    seeds: tuple[int, ...],
    done: dict[int, PrivacyNeurons],
) -> tuple[list[float], list[float]]:
    """Pairwise Jaccard of the learned sets of ``seeds`` at the injected budget, and recalls."""
    if len(seeds) < 2:
        return [], []
    sets = []
    for seed in seeds:
        if seed not in done:
            config = replace(localization, budget=truth.count, seed=seed)
            done[seed] = localize(model, batches, config)
        sets.append(done[seed])
    jaccard = [a.jaccard(b) for a, b in itertools.combinations(sets, 2)]
    recalls = [recall_precision(found, truth)["recall"] for found in sets]
    return jaccard, recalls


# ---- a base model that has not seen the PII ----


@dataclass(frozen=True)
class CleanTrainingConfig:
    """Settings of :func:`train_without_pii`.

    Attributes:
        steps: AdamW steps over all parameters.
        lr: learning rate.
        batch_size: sequences per step.
        window: tokens per general-text sequence, BOS included (capped at ``n_ctx``).
        seed: seed of the sequence order.
    """

    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 16
    window: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}.")
        if self.window < 2:
            raise ValueError(f"window must be at least 2 tokens, got {self.window!r}.")


def redact(record: PIIRecord) -> str:
    """Return the record's text with each PII span replaced by its placeholder, e.g. ``[EMAIL]``."""
    text = record.text
    for span in sorted(record.spans, key=lambda s: s.start, reverse=True):
        text = text[: span.start] + placeholder(span.type) + text[span.end :]
    return text


def train_without_pii(
    model: Any,
    records: Sequence[PIIRecord],
    general: str | None = None,
    config: CleanTrainingConfig | None = None,
) -> list[float]:
    """Train every parameter on the records with their PII redacted, plus general text.

    The model learns the records' wording and the placeholders ``[NAME]``, ``[EMAIL]``, ...
    but is never trained on a PII string, so PII injected later is new to it.

    Args:
        model: a TransformerLens model with a tokenizer, trained in place.
        records: records whose redacted text is trained on.
        general: extra PII-free text, cut into windows; None uses
            :func:`tl_privacy.data.general_text`, ``""`` adds none.

    Returns:
        The loss of every step (mean next-token cross-entropy, nats).
    """
    config = config or CleanTrainingConfig()
    tokenizer = _tokenizer(model)
    sequences = _clean_sequences(model, tokenizer, _check_records(records), general, config)
    device = next(iter(model.parameters())).device
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    pad_id = pad_token_id(tokenizer)

    losses = []
    model.train()
    order: list[int] = []
    for _ in range(config.steps):
        if len(order) < config.batch_size:
            order += torch.randperm(len(sequences), generator=generator).tolist()
        chosen, order = order[: config.batch_size], order[config.batch_size :]
        input_ids, attention_mask = _right_pad([sequences[i] for i in chosen], pad_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logits = model(input_ids, attention_mask=attention_mask, return_type="logits")
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    logger.info(
        "trained without PII for %d steps: loss %.3f -> %.3f", config.steps, losses[0], losses[-1]
    )
    return losses


def _clean_sequences(
    model: Any,
    tokenizer: Any,
    records: list[PIIRecord],
    general: str | None,
    config: CleanTrainingConfig,
) -> list[Int[Tensor, " pos"]]:
    n_ctx = int(model.cfg.n_ctx)
    window = min(config.window, n_ctx)
    sequences = []
    bos = tokenizer.bos_token_id
    for record in records:
        ids = tokenizer(redact(record), add_special_tokens=False)["input_ids"]
        ids = ([bos] if bos is not None else []) + list(ids)
        sequences.append(torch.tensor(ids[:n_ctx], dtype=torch.long))
    if general != "":
        sequences += text_windows(tokenizer, general, window=window)
    return sequences


def _right_pad(
    sequences: list[Tensor], pad_id: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = sequence
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


__all__ = [
    "METHODS",
    "ablation_effects",
    "CleanTrainingConfig",
    "GroundTruthConfig",
    "GroundTruthResult",
    "InjectionConfig",
    "InjectionResult",
    "MethodScore",
    "NeuronSlices",
    "choose_neurons",
    "general_windows",
    "inject",
    "neuron_parameters",
    "recall_precision",
    "redact",
    "run_ground_truth",
    "train_without_pii",
    "verify_neuron_axes",
]
