"""The benchmark scripts' core functions on the smallest settings, into a temporary file."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tl_privacy.cache import CACHE_ENV
from tl_privacy.neurons import PrivacyNeurons

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
LOCALIZATION_METHODS = (
    "hard_concrete",
    "random",
    "activation",
    "integrated_gradients",
    "slimming",
)


def load_script(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` from its path, with the script folder on sys.path."""
    if str(BENCHMARKS) not in sys.path:
        # The scripts import their sibling module _markdown, as they do when run directly.
        sys.path.insert(0, str(BENCHMARKS))
    module_name = f"benchmark_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def section(doc: Path, name: str) -> str:
    text = doc.read_text(encoding="utf-8")
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    assert begin in text, text[:500]
    assert end in text, text[-500:]
    return text[text.index(begin) : text.index(end)]


def table_lines(text: str) -> list[list[str]]:
    """Return the cells of every markdown table line in ``text``, separator excluded."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def last_json_line(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


# ---- localization ----


@pytest.fixture(scope="module")
def localization() -> ModuleType:
    return load_script("localization")


@pytest.fixture(scope="module")
def small_run(localization, tmp_path_factory):
    """A memorized tiny model on 4 people, memorized into a temporary cache."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache))
        return localization.prepare_run(small_options(localization))


def small_options(localization: ModuleType, **overrides) -> object:
    settings = dict(
        model="tiny",
        budgets=(0.01,),
        steps=3,
        candidates=2,
        extraction="teacher_forced",
        n_people=4,
        general_text_tokens=128,
    )
    settings.update(overrides)
    return localization.Options(**settings)


@pytest.fixture(scope="module")
def per_budget(localization, small_run, tmp_path_factory) -> tuple[object, Path, str, dict]:
    """Run the benchmark at one budget; return the benchmark, doc, stdout and JSON result."""
    doc = tmp_path_factory.mktemp("doc") / "benchmarks.md"
    benchmark = localization.run_benchmark(small_options(localization), small_run)
    output = io.StringIO()
    with redirect_stdout(output):
        result = localization.report(benchmark, small_run, doc=doc)
    return benchmark, doc, output.getvalue(), result


def test_localization_table_rows(localization, per_budget):
    _, doc, output, _ = per_budget

    rows = table_lines(section(doc, "localization-tiny"))

    assert rows[0] == localization.HEADER
    labels = [row[0] for row in rows[1:]]
    assert labels[0] == "clean model (no ablation)"
    assert labels[1:6] == [localization.LABELS[m] for m in LOCALIZATION_METHODS]
    assert labels[6].endswith("computed, not run")
    assert len(rows) == 8
    assert "Learned masks at 1%" in output


def test_localization_json_line(per_budget):
    _, _, output, result = per_budget

    printed = last_json_line(output)

    assert printed == json.loads(json.dumps(result))
    assert [row["method"] for row in printed["rows"]] == list(LOCALIZATION_METHODS)
    assert printed["budgets"] == [0.01]
    assert printed["mode"] == "per_budget"
    for row in printed["rows"]:
        assert row["budget_neurons"] == 10
        assert 0 < row["selected"] <= 10
        assert 0.0 <= row["extraction_exact"] <= 1.0
    assert 0.0 < printed["clean"]["extraction_exact"] <= 1.0


def test_localization_per_layer_ig_passes(per_budget):
    benchmark, _, output, _ = per_budget

    summary = last_json_line(output)["summary"]

    n_layers = benchmark.n_layers
    clean_passes = summary["ig_joint_forward"] - summary["ig_joint_backward"]
    assert summary["ig_per_layer_computed"] is True
    assert summary["ig_per_layer_backward"] == n_layers * summary["ig_joint_backward"]
    assert summary["ig_per_layer_forward"] == clean_passes + n_layers * summary["ig_joint_backward"]
    learned_total = summary["learned_forward"] + summary["learned_backward"]
    joint_total = summary["ig_joint_forward"] + summary["ig_joint_backward"]
    assert summary["ratio_learned_to_ig_joint"] == pytest.approx(learned_total / joint_total)


def test_localization_rank_from_largest(localization, small_run, tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    options = small_options(localization, budgets=(0.02, 0.005), mode="from_largest")

    benchmark = localization.run_benchmark(options, small_run)
    localization.report(benchmark, small_run, doc=doc)
    printed = last_json_line(capsys.readouterr().out)

    assert printed["budgets"] == [0.005, 0.02]
    by_method: dict[str, list[dict]] = {}
    for row in printed["rows"]:
        by_method.setdefault(row["method"], []).append(row)
    for method, rows in by_method.items():
        small, large = rows
        assert small["run_id"] == large["run_id"], method
        assert small["forward_passes"] == large["forward_passes"], method
        assert (small["budget_neurons"], large["budget_neurons"]) == (5, 20), method
        assert small["selected"] <= large["selected"], method
    learned_small, learned_large = by_method["hard_concrete"]
    assert learned_small["selected"] == min(5, learned_large["selected"])
    for method in LOCALIZATION_METHODS[1:]:
        assert [row["selected"] for row in by_method[method]] == [5, 20], method
    text = section(doc, "localization-tiny")
    assert localization.SAME_RUN in text
    assert "--rank-from-largest" in text


def test_localization_options_reject_budget(localization):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        localization.Options(budgets=(0.01, 1.5))
    with pytest.raises(ValueError, match="--model"):
        localization.Options(model="gpt-17")


def test_per_layer_ig_passes_formula(localization):
    neurons = PrivacyNeurons.from_scores(torch.arange(8.0).view(2, 4), 2, "integrated_gradients")
    joint = localization.Selection(
        method="integrated_gradients",
        budget=0.25,
        budget_neurons=2,
        neurons=neurons,
        run_id="integrated_gradients@0.25",
        seconds=1.0,
        forward_passes=3 * (1 + 20),
        backward_passes=3 * 20,
    )

    passes = localization.per_layer_ig_passes(joint, n_layers=30)

    assert passes == {"forward_passes": 3 + 30 * 60, "backward_passes": 30 * 60}


# ---- scaling ----


@pytest.fixture(scope="module")
def scaling() -> ModuleType:
    return load_script("scaling")


def test_scaling_table_and_json(scaling, tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"

    measurements = scaling.run_scaling(["tiny-2"], ["float32", "bfloat16"], 5, isolate=False)
    result = scaling.report(measurements, 5, doc=doc)
    output = capsys.readouterr().out

    rows = table_lines(section(doc, "scaling"))
    assert rows[0] == scaling.HEADER
    assert [(row[0], row[7]) for row in rows[1:]] == [
        ("tiny-2", "float32"),
        ("tiny-2", "bfloat16"),
    ]
    assert rows[1][1:5] == ["2", "256", "1024", "512"]
    assert "--no-isolate" in section(doc, "scaling")

    printed = last_json_line(output)
    assert printed == json.loads(json.dumps(result))
    for row in printed["rows"]:
        assert len(row["step_seconds"]) == 5
        assert row["n_neurons"] == 2 * 1024
        assert row["median_step_s"] > 0
        assert row["steps_per_s"] == pytest.approx(1 / row["median_step_s"])
        assert row["peak_rss_mib"] > 0


def test_scaling_gpu_notes_keep_other_sections(scaling, tmp_path):
    doc = tmp_path / "benchmarks.md"
    scaling.write_section("scaling", "Scaling", "table", doc=doc)

    scaling.write_gpu_notes(doc)

    assert "table" in section(doc, "scaling")
    notes = section(doc, "gpu")
    assert "device_map" in notes
    assert "untested" in notes


def test_scaling_model_names(scaling):
    assert scaling.tiny_layers("tiny-8") == 8
    assert scaling.tiny_layers("smollm2-135m") is None
    for name in ("tiny-0", "tiny", "gpt2"):
        with pytest.raises(ValueError, match="unknown model"):
            scaling.tiny_layers(name)


def test_scaling_cli_rejects_few_steps(scaling):
    args = scaling.parse_args(["--models", "tiny-2", "--steps", "2"])

    with pytest.raises(SystemExit, match="--steps must be at least 5"):
        scaling.check_args(args)


# ---- tiny target ----


def test_tiny_target_seed_zero(tmp_path):
    """The core target on the pretrained-then-memorized tiny model, one gate seed."""
    tiny_target = load_script("tiny_target")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path / "cache"))
        args = tiny_target.parse_args(["--seeds", "0", "--no-write"])
        outcome = tiny_target.run(args)

    clean, row = outcome["clean"], outcome["rows"][0]
    assert clean.extraction >= 0.9
    assert row["k"] == round(0.05 * 2 * outcome["model"]["d_mlp"])
    # The benchmark measured an 85.6% cut and a 1.2-point accuracy drop at seed 0; the floors
    # leave room for other CPUs' rounding.
    assert tiny_target.cut(clean, row["learned"]) >= 0.7
    assert clean.accuracy - row["learned"].accuracy <= 0.02
    assert tiny_target.cut(clean, row["random"]) <= 0.3
    assert "| 0 | 51 |" in tiny_target.render(args, outcome)


# ---- demo ----


def test_demo_heldout_note():
    demo = load_script("demo")
    measured = {"metrics": {"clean": {"heldout_exposure_mean": 2.5, "exposure_mean": 6.66}}}
    unmeasured = {"metrics": {"clean": {"heldout_exposure_mean": None, "exposure_mean": 6.66}}}

    assert "2.50 bits" in demo.heldout_note(measured)
    assert "6.66" in demo.heldout_note(measured)
    assert demo.heldout_note(unmeasured) == ""


# ---- memory ----


def test_memory_measure_on_tiny_model():
    memory = load_script("memory")
    from tests._memorized import make_tiny_model

    model = make_tiny_model(d_mlp=64)
    values = memory.measure(model, "float32", steps=4, lengths=(20, 24, 28))

    assert len(values["single_step_peak_mib"]) == 3
    assert all(peak >= 0 for peak in values["single_step_peak_mib"])
    assert values["run_peak_mib"] >= 0
    largest = max(values["single_step_peak_mib"])
    if largest > 0:
        assert values["ratio"] == pytest.approx(values["run_peak_mib"] / largest, abs=1e-3)
    else:
        assert values["ratio"] is None
    assert all(not model.hook_dict[f"blocks.{i}.mlp.hook_post"].fwd_hooks for i in range(2))


def test_memory_batches_shapes():
    memory = load_script("memory")

    batches = memory.synthetic_batches(d_vocab=256)

    assert [b["input_ids"].shape[1] for b in batches] == list(memory.BATCH_LENGTHS)
    assert all(b["input_ids"].shape[0] == memory.BATCH_ROWS for b in batches)
    assert all(int(b["pii_mask"].sum()) == memory.BATCH_ROWS * memory.PII_TOKENS for b in batches)
