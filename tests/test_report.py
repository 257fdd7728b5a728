"""The HTML report, the offline circuitsvis view and PII redaction, without a trained model."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import pytest
import torch

from tl_privacy.data.records import PIIRecord, PIISpan
from tl_privacy.neurons import PrivacyNeurons
from tl_privacy.redact import RedactingFilter, Redactor
from tl_privacy.report import (
    REQUIRED_ENTRIES,
    missing_entries,
    plot_heatmap,
    plot_neurons_per_layer,
    render_report,
    write_report,
)
from tl_privacy.visualize import (
    NeuronActivations,
    circuitsvis_bundle,
    neuron_activation_view,
    props_json,
)

TYPES = ("EMAIL", "PHONE", "NAME", "ADDRESS")
REMOTE = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)
URL_ATTRIBUTES = ("src", "href", "action", "data", "poster", "srcset", "formaction")


class _References(HTMLParser):
    """Collects URL-valued attributes, img sources and script bodies of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.images: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in URL_ATTRIBUTES and value is not None:
                self.urls.append(value)
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        if tag == "script":
            self._in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def parse_references(document: str) -> _References:
    parser = _References()
    parser.feed(document)
    return parser


def remote_references(document: str) -> list[str]:
    """Return every remote URL the document would load or link to (empty when offline-safe)."""
    found = [url for url in parse_references(document).urls if REMOTE.match(url)]
    found += re.findall(r"https?://\S{0,60}", document)
    found += re.findall(r"""(?:import|from)\s*\(?\s*["'](?:https?:)?//[^"']*""", document)
    return found


def sample_results(show_pii: bool = False) -> dict:
    metrics = {
        "extraction_exact": 0.9,
        "extraction_similarity": 0.95,
        "exposure_mean": 8.5,
        "mrr": 0.8,
        "perplexity_general": 20.0,
        "perplexity_heldout": 30.0,
        "by_type": {t: {"extraction_exact": 0.9, "exposure_mean": 8.0} for t in TYPES},
    }
    ablated = {**metrics, "extraction_exact": 0.1, "exposure_mean": 1.5, "mrr": 0.2}
    view = NeuronActivations(
        neuron_labels=["L0.N3", "L1.N7"],
        titles=["record a"],
        tokens=[["<|bos|>", "Hi", " [NAME]", "\u25aa"]],
        activations=[[[0.0, 0.1], [0.5, 0.2], [1.5, -0.1], [0.7, 0.3]]],
    )
    return {
        "model": {"name": "tiny", "n_layers": 2, "d_mlp": 64},
        "data": {"n_train_records": 4, "n_heldout_records": 2, "n_pii_items": 16},
        "privacy_neurons": {
            "count": 3,
            "fraction": 3 / 128,
            "by_layer": [1, 2],
            "baselines": {"random": {"count": 3}},
        },
        "metrics": {"clean": metrics, "ablated": ablated, "baselines": {"random": metrics}},
        "specificity": {
            "jaccard": {a: {b: float(a == b) for b in TYPES} for a in TYPES},
            "cross_ablation": {a: {b: 0.1 if a == b else 0.9 for b in TYPES} for a in TYPES},
        },
        "examples": [
            {
                "type": "EMAIL",
                "prefix": "From: [NAME]\n",
                "target": "[EMAIL]",
                "clean": "[EMAIL]",
                "ablated": "<script>alert(1)</script> see https://example.com/x",
                "clean_exact": True,
                "ablated_exact": False,
            }
        ],
        "neuron_view": view.to_dict(),
        "timing": {"data": 0.1, "localize": 2.0, "total": 2.1},
        "memory": {"data": {"peak_rss_mib": 100.0, "peak_increase_mib": 1.0}},
        "memorization": {"steps": 100, "wall_time_s": 3.0, "extraction_exact": 1.0},
        "config": {"budget": 0.01},
        "show_pii": show_pii,
    }


# ---- report ----


def test_report_has_no_remote_reference():
    document = render_report(sample_results())
    assert remote_references(document) == []


def test_report_images_are_inline_png():
    images = parse_references(render_report(sample_results())).images
    assert len(images) == 3  # layers, Jaccard, cross-ablation
    for source in images:
        assert source.startswith("data:image/png;base64,")
        png = base64.b64decode(source.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_headline_rows():
    document = render_report(sample_results())
    assert "Clean model" in document
    assert "Learned privacy neurons ablated" in document
    assert "Random neurons ablated" in document
    assert "90.0%" in document
    assert "10.0%" in document


def test_report_escapes_example_text():
    document = render_report(sample_results())
    assert "<script>alert(1)</script>" not in document
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in document


def test_report_embeds_neuron_view_once():
    document = render_report(sample_results())
    scripts = parse_references(document).scripts
    bundles = [s for s in scripts if "var CircuitsVis" in s]
    assert len(bundles) == 1
    calls = [s for s in scripts if "CircuitsVis.render(" in s and "var CircuitsVis" not in s]
    assert len(calls) == 1
    assert "CircuitsVis.TextNeuronActivations" in calls[0]
    assert "L1.N7" in calls[0]


def test_report_states_redaction():
    assert "PII is redacted" in render_report(sample_results(show_pii=False))
    assert "--show-pii" in render_report(sample_results(show_pii=True))


def test_report_tolerates_partial_results():
    document = render_report({"model": {"name": "m", "n_layers": 1, "d_mlp": 4}})
    assert "<h1>tl-privacy report</h1>" in document
    assert "<img" not in document


@pytest.mark.parametrize(
    ("results", "missing"),
    [
        ({"command": "x"}, ["model", "privacy_neurons", "metrics"]),
        ({"model": {"name": "m"}, "privacy_neurons": {"count": 1}, "metrics": {}}, ["metrics"]),
        (
            {"model": {"name": "m"}, "privacy_neurons": {"count": 1}, "metrics": {"clean": {}}},
            ["metrics.clean", "metrics.ablated"],
        ),
        ({"model": "m", "privacy_neurons": {"count": 1}, "metrics": []}, ["model", "metrics"]),
    ],
)
def test_missing_entries_listed(results, missing):
    assert missing_entries(results) == missing


def test_missing_entries_none_for_full_results():
    assert missing_entries(sample_results()) == []
    assert set(REQUIRED_ENTRIES) >= {"model", "metrics.clean", "metrics.ablated"}


def test_localize_report_explains_scope():
    results = {
        "command": "localize",
        "model": {"name": "m", "n_layers": 2, "d_mlp": 8},
        "privacy_neurons": {"count": 2, "fraction": 0.125, "by_layer": [1, 1]},
        "metrics": {"clean": {"extraction_exact": 1.0}, "ablated": {"extraction_exact": 0.25}},
    }

    document = render_report(results)

    assert "25.0%" in document
    assert "tl-privacy evaluate --neurons" in document
    assert "Exposure:" not in document
    assert "Exposure:" in render_report(sample_results())


def test_write_report_creates_file(tmp_path):
    path = write_report(sample_results(), tmp_path)
    assert path == tmp_path / "report.html"
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_plots_are_png_data_uris():
    for uri in (
        plot_neurons_per_layer([0, 3, 1]),
        plot_heatmap({"A": {"A": 1.0}}, "t", "Blues", (0, 1)),
    ):
        assert uri.startswith("data:image/png;base64,")


# ---- circuitsvis bundle and view ----


def test_bundle_has_no_url_or_script_end():
    bundle = circuitsvis_bundle()
    assert "var CircuitsVis" in bundle
    assert "://" not in bundle
    assert "</script" not in bundle
    assert "sourceMappingURL" not in bundle


def test_props_json_is_script_safe():
    text = props_json({"tokens": ["</script>", "https://x.example"], "skip": None})
    assert "</" not in text
    assert "://" not in text
    assert "skip" not in text


@pytest.fixture(scope="module")
def tiny_view_model(tmp_path_factory):
    from tl_privacy.models import tiny_model, train_tokenizer

    texts = ["Mail ana.lopez@example.com or call (212) 555-0142.", "Ana Lopez lives here."]
    tokenizer = train_tokenizer(texts, tmp_path_factory.mktemp("tokenizer"), vocab_size=300)
    return tiny_model(tokenizer, d_model=32, d_mlp=16, n_heads=2), tokenizer


def test_view_renders_inline_bundle(tiny_view_model):
    model, tokenizer = tiny_view_model
    neurons = PrivacyNeurons.from_scores(torch.arange(32.0).view(2, 16), 4, "test")
    view = neuron_activation_view(model, tokenizer, "Ana Lopez lives here.", neurons)
    html = view._repr_html_()
    assert html == str(view)
    assert "var CircuitsVis" in html
    assert "CircuitsVis.TextNeuronActivations" in html
    assert remote_references(html) == []


def test_view_redacts_pii_tokens(tiny_view_model):
    from tl_privacy.visualize import neuron_activations

    model, tokenizer = tiny_view_model
    text = "Mail ana.lopez@example.com or call (212) 555-0142."
    record = PIIRecord(text, (PIISpan(5, 26, "EMAIL"), PIISpan(35, 49, "PHONE")))
    neurons = PrivacyNeurons.from_scores(torch.arange(32.0).view(2, 16), 3, "test")
    data = neuron_activations(model, tokenizer, record, neurons, redact=True)
    shown = "".join(data.tokens[0])
    assert "ana" not in shown
    assert "555" not in shown
    assert "[EMAIL]" in shown
    assert "[PHONE]" in shown
    assert len(data.activations[0]) == len(data.tokens[0])
    assert len(data.activations[0][0]) == 3
    # The highest-scoring neurons come first.
    assert data.neuron_labels == ["L1.N15", "L1.N14", "L1.N13"]


def test_view_rejects_empty_set(tiny_view_model):
    model, tokenizer = tiny_view_model
    empty = PrivacyNeurons(mask=torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty"):
        neuron_activation_view(model, tokenizer, "Ana Lopez lives here.", empty)


def test_view_data_round_trips():
    data = NeuronActivations(["L0.N1"], ["t"], [["a", "b"]], [[[0.1], [0.2]]])
    again = NeuronActivations.from_dict(data.to_dict())
    assert again == data
    props = again.props()
    assert props["activations"] == [[[[0.1]], [[0.2]]]]
    assert props["secondDimensionLabels"] == ["L0.N1"]


# ---- redaction ----


def _records() -> list[PIIRecord]:
    pieces = [
        ("From: ", None),
        ("Dana Whitfield", "NAME"),
        ("\n", None),
        ("dana.whitfield@example.com", "EMAIL"),
        (" | ", None),
        ("(212) 555-0143", "PHONE"),
        ("\n", None),
        ("88 Birch Lane, Dayton, OH", "ADDRESS"),
    ]
    text, spans = "", []
    for piece, pii_type in pieces:
        if pii_type is not None:
            spans.append(PIISpan(len(text), len(text) + len(piece), pii_type))
        text += piece
    return [PIIRecord(text, tuple(spans), "r1")]


def test_redactor_replaces_known_strings():
    redactor = Redactor.from_records(_records())
    text = "Dana Whitfield at 88 Birch Lane, Dayton, OH wrote dana.whitfield@example.com"
    assert redactor.redact(text) == "[NAME] at [ADDRESS] wrote [EMAIL]"


def test_redactor_replaces_name_parts():
    redactor = Redactor.from_records(_records())
    assert redactor.redact("Dear Dana,") == "Dear [NAME],"
    assert redactor.redact("Danaher") == "Danaher"


def test_redactor_finds_unknown_email_and_phone():
    redactor = Redactor()
    text = "write to x.y@example.org or call +1-303-555-0111"
    assert redactor.redact(text) == "write to [EMAIL] or call [PHONE]"


def test_redactor_keeps_numbers_in_logs():
    redactor = Redactor()
    line = "[localize] 460 privacy neurons (0.998% of all) (123.4567 s, peak memory 1024 MiB)"
    assert redactor.redact(line) == line


def test_redactor_disabled_returns_input():
    redactor = Redactor.from_records(_records(), enabled=False)
    assert redactor.redact("Dana Whitfield") == "Dana Whitfield"
    assert redactor.redact_generated("555-0143") == "555-0143"


def test_redact_record_uses_spans():
    record = _records()[0]
    redactor = Redactor()
    assert redactor.redact_record(record) == "From: [NAME]\n[EMAIL] | [PHONE]\n[ADDRESS]"
    assert redactor.redact_record(record, end=25) == "From: [NAME]\n[EMAIL]"


def test_redact_generated_masks_characters():
    redactor = Redactor.from_records(_records())
    assert redactor.redact_generated("(212) 555-01") == "(###) ###-##"
    assert redactor.redact_generated("christopher_wil@example.") == "xxxxxxxxxxx_xxx@xxxxxxx."
    assert redactor.redact_generated("Dana Whitfield, 12 Elm") == "[NAME], ## xxx"


def test_logging_filter_redacts_arguments():
    import logging

    redactor = Redactor.from_records(_records())
    record = logging.LogRecord(
        "tl_privacy", logging.INFO, "", 0, "hello %s", ("Dana Whitfield",), None
    )
    assert RedactingFilter(redactor).filter(record)
    assert record.getMessage() == "hello [NAME]"


def test_label_known_adds_unlabelled_names():
    redactor = Redactor.from_records(_records())
    record = PIIRecord("Hi Dana, write to Dana Whitfield.", (PIISpan(18, 32, "NAME"),))
    labelled = redactor.label_known(record)
    assert [(s.start, s.end, s.type) for s in labelled.spans] == [(3, 7, "NAME"), (18, 32, "NAME")]
