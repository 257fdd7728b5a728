"""circuitsvis views of privacy-neuron activations that render offline.

circuitsvis renders a view twice: ``local_src`` inlines its JavaScript bundle, and
``cdn_src`` (what ``str(view)`` returns) imports the bundle from unpkg.com. Its Jupyter hook
picks between the two by trying to open google.com first. The views built here always use
the inline bundle and never probe the network, so they show in a notebook or a saved HTML
file on a machine without internet access.

The inline bundle is rewritten so that an HTML file that contains it has no URL in it. Every
``://`` inside the bundle's JavaScript strings becomes the equivalent escape ``:\\/\\/``, and a
``</script`` inside a string becomes ``<\\/script``. The source-map comment is dropped.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from circuitsvis.utils.render import RenderedHTML
from jaxtyping import Float
from torch import Tensor

from tl_privacy.data.records import PIIRecord, add_automatic_labels
from tl_privacy.data.tokenization import tokenize_record, type_names_for
from tl_privacy.hooks import attached, check_model, mlp_post_name
from tl_privacy.neurons import PrivacyNeurons

ELEMENT = "TextNeuronActivations"
GROUP_LABEL = "privacy neurons"

# Shown instead of the second and later tokens of a redacted PII span, so that each token
# keeps a hoverable box with its activations.
HIDDEN_TOKEN = "\u25aa"


class OfflineHTML(RenderedHTML):
    """A circuitsvis ``RenderedHTML`` whose every representation is the inline-bundle HTML."""

    def __init__(self, html: str) -> None:
        super().__init__(local_src=html, cdn_src=html)

    def _repr_html_(self) -> str:
        return self.local_src

    def __str__(self) -> str:
        return self.local_src


@dataclass
class NeuronActivations:
    """Activations of chosen MLP neurons on tokenized texts, ready for a circuitsvis view.

    Attributes:
        neuron_labels: one ``"L{layer}.N{neuron}"`` label per neuron shown.
        titles: one title per text.
        tokens: per text, the display string of each token (PII masked when redacted).
        activations: per text, a ``[pos, n_neurons]`` list of ``hook_post`` activations,
            rounded to 4 decimals.
    """

    neuron_labels: list[str]
    titles: list[str]
    tokens: list[list[str]]
    activations: list[list[list[float]]]

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form stored in ``results.json`` under ``neuron_view``."""
        return {
            "neuron_labels": self.neuron_labels,
            "titles": self.titles,
            "tokens": self.tokens,
            "activations": self.activations,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeuronActivations:
        """Read the form written by :meth:`to_dict`."""
        return cls(
            neuron_labels=list(data["neuron_labels"]),
            titles=list(data.get("titles") or [f"text {i}" for i in range(len(data["tokens"]))]),
            tokens=[list(tokens) for tokens in data["tokens"]],
            activations=[list(rows) for rows in data["activations"]],
        )

    def props(self) -> dict[str, Any]:
        """Return the properties of circuitsvis' ``TextNeuronActivations`` element.

        circuitsvis expects ``[pos, layers, neurons]`` per text. All neurons go into one
        group named ``GROUP_LABEL``, because the chosen neurons come from several layers in
        unequal numbers.
        """
        return {
            "tokens": self.tokens,
            "activations": [[[row] for row in rows] for rows in self.activations],
            "firstDimensionName": "Group",
            "secondDimensionName": "Neuron",
            "firstDimensionLabels": [GROUP_LABEL],
            "secondDimensionLabels": self.neuron_labels,
        }


@functools.lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """Return circuitsvis' browser bundle, rewritten to contain no URL (see the module doc).

    The bundle defines the global ``CircuitsVis`` when run as a classic script.
    """
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise FileNotFoundError(
            f"circuitsvis' JavaScript bundle {path} is missing; reinstall circuitsvis"
        )
    source = path.read_text(encoding="utf-8")
    lines = [line for line in source.splitlines() if not line.startswith("//# sourceMappingURL")]
    source = "\n".join(lines)

    # Minified code has no comments, so "://" and "</script" occur only inside string and
    # template literals, where "\/" means "/".
    return source.replace("://", ":\\/\\/").replace("</script", "<\\/script")


def props_json(props: dict[str, Any]) -> str:
    """Serialize element properties as JSON that is safe inside an inline ``<script>``."""
    text = json.dumps({key: value for key, value in props.items() if value is not None})
    return text.replace("<", "\\u003c").replace("/", "\\/")


def render_call(
    element: str, props: dict[str, Any], element_id: str | None = None, *, bundle: bool = False
) -> str:
    """Return a ``<div>`` and a module script that renders ``element`` into it.

    Without ``bundle`` the script uses the global ``CircuitsVis`` that a classic script with
    :func:`circuitsvis_bundle` defines earlier in the page; module scripts run after the
    page is parsed, so that script has run by then. With ``bundle`` the bundle goes into
    the same script, as circuitsvis' own ``local_src`` does, which is what notebooks need.
    """
    element_id = element_id or f"circuits-vis-{uuid.uuid4().hex[:12]}"
    inline = f"{circuitsvis_bundle()}\n" if bundle else ""
    return (
        f'<div id="{element_id}" class="circuitsvis-view" style="margin: 15px 0;"></div>\n'
        f'<script type="module">\n{inline}'
        f'CircuitsVis.render("{element_id}", CircuitsVis.{element}, {props_json(props)});\n'
        f"</script>"
    )


def render_offline(element: str, props: dict[str, Any]) -> OfflineHTML:
    """Render a circuitsvis element with its bundle inline, for notebooks and saved files."""
    return OfflineHTML(render_call(element, props, bundle=True))


def choose_neurons(neurons: PrivacyNeurons, max_neurons: int) -> list[tuple[int, int]]:
    """Return up to ``max_neurons`` selected ``(layer, neuron)`` pairs, highest score first.

    Sets without scores keep layer order.
    """
    if max_neurons < 1:
        raise ValueError(f"max_neurons must be at least 1, got {max_neurons}")
    chosen = neurons.indices()
    if neurons.scores is not None:
        chosen.sort(key=lambda pair: -float(neurons.scores[pair]))
    return chosen[:max_neurons]


def neuron_activations(
    model: Any,
    tokenizer: Any,
    texts: str | PIIRecord | Sequence[str | PIIRecord],
    neurons: PrivacyNeurons,
    max_neurons: int = 16,
    *,
    redact: bool = False,
    titles: Sequence[str] | None = None,
) -> NeuronActivations:
    """Run ``model`` on each text and collect the ``hook_post`` activations of chosen neurons.

    Args:
        texts: one text or several; a ``PIIRecord`` brings its PII spans.
        neurons: the set whose neurons are shown (see :func:`choose_neurons`).
        max_neurons: maximum number of neurons shown, highest scores first.
        redact: show each PII span as ``[TYPE]`` on its first token and ``HIDDEN_TOKEN`` on
            the others. Plain strings are labelled with ``label_pii`` (e-mail addresses and
            phone numbers) first.
        titles: one title per text; defaults to the record ids or ``"text {i}"``.
    """
    neurons.check_compatible(model)
    records = [_as_record(text, redact) for text in _as_list(texts)]
    if titles is not None and len(titles) != len(records):
        raise ValueError(f"got {len(titles)} titles for {len(records)} texts; give one per text")
    chosen = choose_neurons(neurons, max_neurons)
    if not chosen:
        raise ValueError("the neuron set is empty; there are no neurons to show")

    type_names = type_names_for(records)
    all_tokens, all_activations = [], []
    for record in records:
        tokenized = tokenize_record(tokenizer, record, type_names=type_names)
        values = _chosen_activations(model, tokenized.input_ids, chosen)
        all_tokens.append(_display_tokens(tokenizer, record, tokenized, redact))
        all_activations.append([[round(float(v), 4) for v in row] for row in values.tolist()])

    default_titles = [record.record_id or f"text {i}" for i, record in enumerate(records)]
    return NeuronActivations(
        neuron_labels=[f"L{layer}.N{neuron}" for layer, neuron in chosen],
        titles=list(titles) if titles is not None else default_titles,
        tokens=all_tokens,
        activations=all_activations,
    )


def neuron_activation_view(
    model: Any,
    tokenizer: Any,
    text: str | PIIRecord | Sequence[str | PIIRecord],
    neurons: PrivacyNeurons,
    max_neurons: int = 16,
    *,
    redact: bool = False,
) -> OfflineHTML:
    """Show the activations of the privacy neurons on ``text``, token by token, offline.

    Returns a circuitsvis ``RenderedHTML`` (Jupyter displays it) that carries circuitsvis'
    JavaScript inline. Drop-downs choose the text and the neuron; see
    :func:`neuron_activations` for the arguments.
    """
    data = neuron_activations(model, tokenizer, text, neurons, max_neurons, redact=redact)
    return render_offline(ELEMENT, data.props())


def _as_list(texts: str | PIIRecord | Sequence[str | PIIRecord]) -> list[str | PIIRecord]:
    if isinstance(texts, (str, PIIRecord)):
        return [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("got no text to show; give at least one text")
    return texts


def _as_record(text: str | PIIRecord, redact: bool) -> PIIRecord:
    if isinstance(text, PIIRecord):
        return text
    if not isinstance(text, str):
        raise TypeError(f"a text must be a str or PIIRecord, got {type(text).__name__}")
    record = PIIRecord(text)
    return add_automatic_labels(record) if redact else record


def _chosen_activations(
    model: Any, input_ids: Tensor, chosen: list[tuple[int, int]]
) -> Float[Tensor, "pos n_chosen"]:
    check_model(model)
    layers = sorted({layer for layer, _ in chosen})
    captured: dict[int, Tensor] = {}

    def capture(layer: int):
        def store(activation: Tensor, hook: Any) -> Tensor:
            captured[layer] = activation[0].detach().float().cpu()
            return activation

        return store

    device = next(iter(model.parameters())).device
    hooks = [(mlp_post_name(layer), capture(layer)) for layer in layers]
    with torch.no_grad(), attached(model, hooks):
        model(input_ids[None].to(device), return_type="logits")
    columns = [captured[layer][:, neuron] for layer, neuron in chosen]
    return torch.stack(columns, dim=1)


def _display_tokens(tokenizer: Any, record: PIIRecord, tokenized: Any, redact: bool) -> list[str]:
    """Return one display string per token, cut from the text at the token's offsets."""
    bos = getattr(tokenizer, "bos_token", None) or ""
    shown = []
    previous = None
    for start, end in tokenized.offsets:
        if (start, end) == (0, 0):
            shown.append(bos)
        elif (start, end) == previous:
            # Byte-level BPE splits one character into several tokens with equal offsets.
            shown.append("")
        else:
            shown.append(record.text[start:end])
        previous = (start, end)

    if redact:
        for span, (first, stop) in zip(record.spans, tokenized.span_token_ranges, strict=True):
            for position in range(first, stop):
                if position == first:
                    token = shown[position]
                    leading = token[: len(token) - len(token.lstrip())]
                    shown[position] = f"{leading}[{span.type}]"
                elif tokenized.pii_mask[position]:
                    shown[position] = HIDDEN_TOKEN
    return shown
