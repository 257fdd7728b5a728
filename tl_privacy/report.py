"""A self-contained HTML report of a tl-privacy run, rendered from its ``results.json``.

The report is one file that renders without network access: plots are inline base64 PNG
images drawn with matplotlib, styles are inline, and the circuitsvis neuron view carries its
JavaScript bundle inline (see :mod:`tl_privacy.visualize`). Nothing in it references a URL.
Everything shown comes from the results dictionary, so ``tl-privacy report DIR`` can
re-render a report without the model. PII in the results is shown as stored: redacted
unless the run was made with ``--show-pii``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tl_privacy.visualize import ELEMENT, NeuronActivations, circuitsvis_bundle, render_call

REPORT_FILE = "report.html"

# Entries of results.json (dotted paths to JSON objects) without which a report has no numbers
# to show. Every run of `tl-privacy demo`, `localize` and `evaluate` writes all of them.
REQUIRED_ENTRIES: tuple[str, ...] = (
    "model",
    "privacy_neurons",
    "metrics",
    "metrics.clean",
    "metrics.ablated",
)

# (key in an evaluation's metrics, column header, format); percentages are fractions in 0..1.
HEADLINE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("extraction_exact", "Exact extraction", "percent"),
    ("extraction_similarity", "Extraction similarity", "ratio"),
    ("exposure_mean", "Exposure (bits)", "float2"),
    ("mrr", "MRR", "ratio"),
    ("pii_token_accuracy", "PII token accuracy", "percent"),
    ("perplexity_general", "Perplexity, general text", "float2"),
    ("perplexity_heldout", "Perplexity, held-out records", "float2"),
    ("heldout_extraction_exact", "Held-out exact extraction", "percent"),
    ("heldout_exposure_mean", "Held-out exposure (bits)", "float2"),
)

BASELINE_LABELS = {
    "random": "Random neurons",
    "activation": "Highest PII activation",
    "integrated_gradients": "Integrated gradients",
    "slimming": "Slimming (L1 mask)",
}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d0d5; padding: 0.3em 0.6em; text-align: right; }
th { background: #f2f2f5; }
td.label, th.label { text-align: left; }
tr.learned td { background: #eef6ff; font-weight: 600; }
td.text { text-align: left; font-family: ui-monospace, monospace; white-space: pre-wrap;
          max-width: 28em; }
.leak { color: #b3261e; font-weight: 600; } .safe { color: #1e7b34; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.summary { color: #444; }
img.plot { max-width: 100%; height: auto; border: 1px solid #eee; }
details pre { background: #f7f7f9; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #555; font-size: 0.9em; }
"""


def missing_entries(results: Mapping[str, Any]) -> list[str]:
    """Return the ``REQUIRED_ENTRIES`` that ``results`` lacks, as dotted paths.

    An entry counts as missing when it is absent, is not a JSON object or is empty. Once a
    parent is missing its children are not listed.
    """
    missing: list[str] = []
    for entry in REQUIRED_ENTRIES:
        parent, _, _ = entry.rpartition(".")
        if parent and parent in missing:
            continue
        value: Any = results
        for key in entry.split("."):
            value = value.get(key) if isinstance(value, Mapping) else None
        if not isinstance(value, Mapping) or not value:
            missing.append(entry)
    return missing


def write_report(results: Mapping[str, Any], folder: str | Path) -> Path:
    """Render ``results`` and write it to ``folder/report.html``; return the path."""
    path = Path(folder) / REPORT_FILE
    path.write_text(render_report(results), encoding="utf-8")
    return path


def render_report(results: Mapping[str, Any]) -> str:
    """Return the report of a run as one self-contained HTML document."""
    sections = [
        _header(results),
        _headline_section(results),
        _by_type_section(results),
        _layers_section(results),
        _specificity_section(results),
        _examples_section(results),
        _neuron_view_section(results),
        _run_section(results),
    ]
    body = "\n".join(section for section in sections if section)
    title = f"tl-privacy report: {_model_name(results)}"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


# ---- sections ----


def _header(results: Mapping[str, Any]) -> str:
    model = results.get("model", {})
    neurons = results.get("privacy_neurons", {})
    data = results.get("data", {})
    facts = [
        f"model <b>{_escape(_model_name(results))}</b> with {model.get('n_layers', '?')} layers "
        f"of {model.get('d_mlp', '?')} MLP neurons",
    ]
    if neurons:
        facts.append(
            f"<b>{neurons.get('count', 0)}</b> privacy neurons "
            f"({_format(neurons.get('fraction'), 'percent3')} of all MLP neurons)"
        )
    if data:
        facts.append(
            f"{data.get('n_train_records', '?')} training and "
            f"{data.get('n_heldout_records', '?')} held-out records, "
            f"{data.get('n_pii_items', '?')} PII items"
        )
    pii_note = (
        "PII is shown as written in the data (run made with --show-pii)."
        if results.get("show_pii")
        else "PII is redacted: each PII string appears as [EMAIL], [PHONE], [NAME] or [ADDRESS]."
    )
    return (
        "<h1>tl-privacy report</h1>\n"
        f'<p class="summary">{"; ".join(facts)}.</p>\n<p class="note">{pii_note}</p>'
    )


def _headline_section(results: Mapping[str, Any]) -> str:
    metrics = results.get("metrics", {})
    if not metrics:
        return ""
    counts = _row_counts(results)
    rows: list[tuple[str, Mapping[str, Any], Any, bool]] = []
    if "clean" in metrics:
        rows.append(("Clean model", metrics["clean"], 0, False))
    if "ablated" in metrics:
        rows.append(
            ("Learned privacy neurons ablated", metrics["ablated"], counts.get("learned"), True)
        )
    for method, values in metrics.get("baselines", {}).items():
        rows.append(
            (f"{BASELINE_LABELS.get(method, method)} ablated", values, counts.get(method), False)
        )

    # A column that no run measured (held-out exposure is opt-in) would hold only dashes.
    columns = [
        c for c in HEADLINE_COLUMNS if any(values.get(c[0]) is not None for _, values, _, _ in rows)
    ]
    header = "".join(f"<th>{_escape(label)}</th>" for _, label, _ in columns)
    lines = [
        f'<table class="headline"><tr><th class="label">Model</th><th>Neurons</th>{header}</tr>'
    ]
    for label, values, count, learned in rows:
        cells = "".join(f"<td>{_format(values.get(key), kind)}</td>" for key, _, kind in columns)
        css = ' class="learned"' if learned else ""
        lines.append(
            f'<tr{css}><td class="label">{_escape(label)}</td><td>{_format(count, "int")}</td>'
            f"{cells}</tr>"
        )
    lines.append("</table>")
    return (
        "<h2>Before and after ablation</h2>\n"
        + "\n".join(lines)
        + f'\n<p class="note">{_headline_note(results)}</p>'
    )


def _headline_note(results: Mapping[str, Any]) -> str:
    if results.get("command") == "localize":
        # `tl-privacy localize` measures exact extraction with one teacher-forced pass and
        # nothing else, so the note points to the command that measures the rest.
        return (
            "Exact extraction: share of PII items whose every token the model predicts "
            "(argmax) from the true preceding text, which for an exact match is the same as "
            "greedy decoding. <code>tl-privacy localize</code> measures only this; run "
            "<code>tl-privacy evaluate --neurons OUT/neurons</code> for exposure, MRR, "
            "perplexity and the examples."
        )
    explanation = (
        "Exact extraction: share of PII items that greedy decoding from the record's prefix "
        "reproduces exactly. Exposure: how far the true PII ranks above same-format "
        "candidates, in bits (higher means more memorized). MRR: mean reciprocal rank of the "
        "true PII among those candidates. Every baseline ablates exactly as many neurons as "
        "the learned set."
    )
    candidates = _candidates(results)
    if candidates:
        explanation += (
            f" With {candidates:g} candidates per item, exposure is at most "
            f"{math.log2(candidates + 1):.2f} bits and MRR at most 1."
        )
    return explanation


def _by_type_section(results: Mapping[str, Any]) -> str:
    metrics = results.get("metrics", {})
    clean = metrics.get("clean", {}).get("by_type") or {}
    ablated = metrics.get("ablated", {}).get("by_type") or {}
    if not clean:
        return ""
    # Held-out exposure is opt-in, so its column appears only where it was measured.
    heldout = any(_lookup(values, "heldout_exposure_mean") is not None for values in clean.values())
    extra_header = "<th>Exposure, held-out (never seen)</th>" if heldout else ""
    lines = [
        '<table><tr><th class="label">PII type</th><th>Exact extraction, clean</th>'
        "<th>Exact extraction, ablated</th><th>Exposure, clean</th><th>Exposure, ablated</th>"
        f"{extra_header}</tr>"
    ]
    for pii_type, values in clean.items():
        after = ablated.get(pii_type, {})
        extra = (
            f"<td>{_format(_lookup(values, 'heldout_exposure_mean'), 'float2')}</td>"
            if heldout
            else ""
        )
        lines.append(
            f'<tr><td class="label">{_escape(pii_type)}</td>'
            f"<td>{_format(_lookup(values, 'extraction_exact'), 'percent')}</td>"
            f"<td>{_format(_lookup(after, 'extraction_exact'), 'percent')}</td>"
            f"<td>{_format(_lookup(values, 'exposure_mean'), 'float2')}</td>"
            f"<td>{_format(_lookup(after, 'exposure_mean'), 'float2')}</td>{extra}</tr>"
        )
    lines.append("</table>")
    return "<h2>By PII type</h2>\n" + "\n".join(lines)


def _layers_section(results: Mapping[str, Any]) -> str:
    by_layer = results.get("privacy_neurons", {}).get("by_layer")
    if not by_layer:
        return ""
    image = plot_neurons_per_layer(by_layer)
    return (
        "<h2>Privacy neurons per layer</h2>\n"
        f'<img class="plot" id="plot-layers" alt="Privacy neurons per layer" src="{image}">'
    )


def _specificity_section(results: Mapping[str, Any]) -> str:
    specificity = results.get("specificity") or {}
    jaccard = specificity.get("jaccard")
    if not jaccard:
        return ""
    parts = ["<h2>Specificity across PII types</h2>"]
    counts = specificity.get("counts")
    if counts:
        listed = ", ".join(f"{_escape(t)}: {_format(n, 'int')}" for t, n in counts.items())
        parts.append(f"<p>Neurons localized for each PII type alone: {listed}.</p>")
    image = plot_heatmap(jaccard, "Jaccard overlap of per-type neuron sets", "Blues", (0.0, 1.0))
    plots = [f'<img class="plot" id="plot-jaccard" alt="Jaccard overlap" src="{image}">']
    cross = _cross_ablation_matrix(specificity.get("cross_ablation"))
    if cross:
        image = plot_heatmap(
            cross, "Exact extraction after ablating one type's neurons", "Reds", (0.0, 1.0)
        )
        plots.append(f'<img class="plot" id="plot-cross" alt="Cross-ablation" src="{image}">')
    parts.append(f'<div class="plots">{"".join(plots)}</div>')
    if cross:
        parts.append(
            '<p class="note">Cross-ablation rows: the PII type whose neurons are ablated '
            "(each type's set is localized on that type alone). Columns: the PII type whose "
            "exact extraction is measured. A type-specific set lowers its own column.</p>"
        )
    return "\n".join(parts)


def _examples_section(results: Mapping[str, Any]) -> str:
    examples = results.get("examples") or []
    if not examples:
        return ""
    lines = [
        '<table><tr><th class="label">Type</th><th class="label">Prefix (end)</th>'
        '<th class="label">PII</th><th class="label">Clean model</th>'
        '<th class="label">Ablated model</th></tr>'
    ]
    for example in examples:
        lines.append(
            f'<tr><td class="label">{_escape(example.get("type", ""))}</td>'
            f'<td class="text">{_escape(example.get("prefix", ""))}</td>'
            f'<td class="text">{_escape(example.get("target", ""))}</td>'
            f'<td class="text">{_continuation(example, "clean")}</td>'
            f'<td class="text">{_continuation(example, "ablated")}</td></tr>'
        )
    lines.append("</table>")
    note = (
        "Greedy continuations from the record's prefix, as long as the PII in tokens. "
        "Items whose extraction the ablation stopped are listed first. "
        "\u2714 exact PII marks a continuation that reproduces the PII exactly."
    )
    return "<h2>Examples</h2>\n" + "\n".join(lines) + f'\n<p class="note">{note}</p>'


def _continuation(example: Mapping[str, Any], which: str) -> str:
    text = _escape(example.get(which, ""))
    exact = example.get(f"{which}_exact")
    if exact is None:
        return text
    similarity = example.get(f"{which}_similarity")
    if exact:
        mark = '<span class="leak">\u2714 exact PII</span>'
    elif similarity is not None:
        mark = (
            f'<span class="safe">\u2718 differs (similarity {_format(similarity, "ratio")})</span>'
        )
    else:
        mark = '<span class="safe">\u2718 differs</span>'
    return f"{text} {mark}"


def _neuron_view_section(results: Mapping[str, Any]) -> str:
    view = results.get("neuron_view")
    if not view:
        return ""
    data = NeuronActivations.from_dict(view)
    return (
        "<h2>Privacy neuron activations</h2>\n"
        '<p class="note">Activation (MLP <code>hook_post</code>) of the privacy neurons with the '
        "highest scores on example records, token by token. Choose the neuron in the menu; "
        "hover a token to see its value.</p>\n"
        f'<div id="neuron-view">\n<script>\n{circuitsvis_bundle()}\n</script>\n'
        f"{render_call(ELEMENT, data.props(), element_id='circuitsvis-neurons')}\n</div>"
    )


def _run_section(results: Mapping[str, Any]) -> str:
    parts = ["<h2>Run</h2>"]
    memorization = results.get("memorization")
    if memorization:
        parts.append(
            "<p>Memorization: "
            f"{_format(memorization.get('steps'), 'int')} fine-tuning steps in "
            f"{_format(memorization.get('wall_time_s'), 'float1')} s"
            f"{' (cached)' if memorization.get('cached') else ''}, reaching "
            f"{_format(memorization.get('extraction_exact'), 'percent')} exact extraction.</p>"
        )
    timing = results.get("timing") or {}
    cpu_time = results.get("cpu_time") or {}
    memory = results.get("memory") or {}
    if timing:
        lines = [
            '<table><tr><th class="label">Stage</th><th>Wall time (s)</th><th>CPU time (s)</th>'
            "<th>Peak resident memory (MiB)</th><th>Peak increase (MiB)</th></tr>"
        ]
        for stage, seconds in timing.items():
            usage = memory.get(stage, {})
            lines.append(
                f'<tr><td class="label">{_escape(stage)}</td><td>{_format(seconds, "float1")}</td>'
                f"<td>{_format(cpu_time.get(stage), 'float1')}</td>"
                f"<td>{_format(usage.get('peak_rss_mib'), 'float1')}</td>"
                f"<td>{_format(usage.get('peak_increase_mib'), 'float1')}</td></tr>"
            )
        lines.append("</table>")
        parts.append("\n".join(lines))
    config = results.get("config")
    if config:
        parts.append(
            "<details><summary>Configuration</summary><pre>"
            f"{_escape(json.dumps(config, indent=2, default=str))}</pre></details>"
        )
    return "\n".join(parts) if len(parts) > 1 else ""


# ---- plots ----


def plot_neurons_per_layer(by_layer: Sequence[int]) -> str:
    """Draw a bar plot of privacy neurons per layer; return it as a PNG data URI."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.0, 0.35 * len(by_layer) + 2), 3.0), dpi=110)
    axes = figure.add_subplot()
    axes.bar(range(len(by_layer)), by_layer, color="#3b6fb6")
    axes.set_xlabel("layer")
    axes.set_ylabel("privacy neurons")
    axes.set_xticks(range(len(by_layer)))
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    return _png_data_uri(figure)


def plot_heatmap(
    matrix: Mapping[str, Mapping[str, Any]],
    title: str,
    colormap: str,
    limits: tuple[float, float],
) -> str:
    """Draw a labelled heatmap of ``matrix[row][column]``; return it as a PNG data URI."""
    from matplotlib.figure import Figure

    rows = list(matrix)
    columns = list(dict.fromkeys(c for row in matrix.values() for c in row))
    values = [[_as_float(matrix[r].get(c)) for c in columns] for r in rows]

    figure = Figure(figsize=(0.8 * len(columns) + 2.0, 0.6 * len(rows) + 1.5), dpi=110)
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap=colormap, vmin=limits[0], vmax=limits[1])
    axes.set_xticks(range(len(columns)), labels=columns, rotation=30, ha="right")
    axes.set_yticks(range(len(rows)), labels=rows)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if math.isnan(value):
                continue
            shade = (value - limits[0]) / (limits[1] - limits[0])
            axes.text(j, i, f"{value:.2f}", ha="center", va="center",
                      color="white" if shade > 0.6 else "black", fontsize=9)  # fmt: skip
    axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    return _png_data_uri(figure)


def _png_data_uri(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"data:image/png;base64,{encoded}"


# ---- helpers ----


def _cross_ablation_matrix(cross: Any) -> dict[str, dict[str, float]] | None:
    """Reduce a cross-ablation result to ablated type -> measured type -> exact extraction."""
    if not isinstance(cross, Mapping) or not cross:
        return None
    matrix: dict[str, dict[str, float]] = {}
    for ablated, measured in cross.items():
        if not isinstance(measured, Mapping):
            return None
        row = {}
        for pii_type, value in measured.items():
            number = _lookup(value, "extraction_exact") if isinstance(value, Mapping) else value
            row[str(pii_type)] = _as_float(number)
        matrix["no ablation" if ablated == "none" else str(ablated)] = row
    return matrix


def _row_counts(results: Mapping[str, Any]) -> dict[str, Any]:
    neurons = results.get("privacy_neurons", {})
    counts: dict[str, Any] = {"learned": neurons.get("count")}
    for method, info in (neurons.get("baselines") or {}).items():
        counts[method] = info.get("count") if isinstance(info, Mapping) else None
    return counts


def _lookup(values: Any, key: str) -> Any:
    """Return ``values[key]``, also from the ``{"exact_rate": ...}`` form of extraction results."""
    if not isinstance(values, Mapping):
        return values
    if key in values:
        return values[key]
    if key == "extraction_exact":
        return values.get("exact_rate")
    return None


def _candidates(results: Mapping[str, Any]) -> float | None:
    """Return the mean candidates per ranked item of the clean evaluation, if recorded."""
    by_type = results.get("metrics", {}).get("clean", {}).get("by_type") or {}
    counts = [v.get("n_candidates") for v in by_type.values() if isinstance(v, Mapping)]
    counts = [float(c) for c in counts if isinstance(c, (int, float))]
    return max(counts) if counts else None


def _model_name(results: Mapping[str, Any]) -> str:
    return str(results.get("model", {}).get("name", "unknown model"))


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _format(value: Any, kind: str) -> str:
    if value is None or isinstance(value, (dict, list)):
        return "\u2014"
    number = _as_float(value)
    if math.isnan(number):
        return "\u2014"
    if kind == "int":
        return f"{int(number):,}"
    if kind == "percent":
        return f"{number:.1%}"
    if kind == "percent3":
        return f"{number:.3%}"
    if kind == "ratio":
        return f"{number:.3f}"
    if kind == "float1":
        return f"{number:.1f}"
    return f"{number:.2f}"


def _escape(value: Any) -> str:
    # "&#47;" renders as "/", so a URL in the data shows as text but leaves no "://" in the
    # source for a browser or a scanner to act on.
    return html.escape(str(value), quote=True).replace("://", ":&#47;&#47;")
