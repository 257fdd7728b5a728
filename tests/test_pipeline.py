"""The pipeline's stages, and `tl-privacy demo --model tiny` end to end."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from tl_privacy.cache import CACHE_ENV
from tl_privacy.cli import main
from tl_privacy.data.synthetic import SyntheticCorpusConfig, generate_corpus
from tl_privacy.neurons import PrivacyNeurons
from tl_privacy.pipeline import (
    InputError,
    RunConfig,
    StageRecorder,
    choose_examples,
    headline_table,
    staged_output,
    validate,
)
from tl_privacy.report import render_report

TYPES = ("EMAIL", "PHONE", "NAME", "ADDRESS")
HEADLINE = ("extraction_exact", "exposure_mean", "mrr", "perplexity_general", "perplexity_heldout")
BASELINES = ("random", "activation", "integrated_gradients", "slimming")
DEMO_STAGES = (
    "data",
    "model",
    "memorize",
    "tokenize",
    "localize",
    "evaluate",
    "baselines",
    "specificity",
    "examples",
    "neuron view",
)

# The demo's wall-time goal is 60 s on 2 otherwise idle CPU cores, where `tl-privacy demo
# --model tiny` with an empty cache takes about that long. Test runs share the cores with
# other jobs, so the limit here only catches large regressions; the wall time is reported.
DEMO_GOAL_S = 60
DEMO_LIMIT_S = 600

_demo: dict = {}


def shared_tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run `tl-privacy demo --model tiny` once per session with an empty cache; return its folder.

    stdout, stderr, the exit code and the wall time are kept in ``_demo``.
    """
    if not _demo:
        base = tmp_path_factory.mktemp("tiny-demo")
        out = base / "demo"
        stdout, stderr = io.StringIO(), io.StringIO()
        previous_cache = os.environ.get(CACHE_ENV)
        os.environ[CACHE_ENV] = str(base / "cache")
        start = time.perf_counter()
        try:
            with redirect_stdout(stdout), redirect_stderr(stderr):
                code = main(["demo", "--model", "tiny", "--out", str(out)])
        finally:
            if previous_cache is None:
                os.environ.pop(CACHE_ENV, None)
            else:
                os.environ[CACHE_ENV] = previous_cache
        _demo.update(
            out=out,
            code=code,
            seconds=time.perf_counter() - start,
            stdout=stdout.getvalue(),
            stderr=stderr.getvalue(),
        )
    assert _demo["code"] == 0, _demo["stderr"][-3000:]
    return _demo["out"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    return shared_tiny_demo(tmp_path_factory)


@pytest.fixture(scope="module")
def results(demo_out) -> dict:
    return json.loads((demo_out / "results.json").read_text(encoding="utf-8"))


# ---- the tiny demo ----


def test_demo_writes_outputs(demo_out):
    assert (demo_out / "results.json").is_file()
    assert (demo_out / "report.html").is_file()
    assert (demo_out / "neurons" / "config.json").is_file()
    assert (demo_out / "neurons" / "neurons.safetensors").is_file()
    leftovers = [p.name for p in demo_out.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_demo_model_entry(results):
    model = results["model"]
    assert model["name"] == "tiny"
    assert model["n_layers"] == 2
    assert model["d_mlp"] == 512


def test_demo_privacy_neurons(results):
    neurons, model = results["privacy_neurons"], results["model"]
    assert len(neurons["by_layer"]) == model["n_layers"]
    assert sum(neurons["by_layer"]) == neurons["count"]
    assert neurons["fraction"] == pytest.approx(
        neurons["count"] / (model["n_layers"] * model["d_mlp"])
    )
    # The budget (1% of 1024 neurons, rounded) is an upper bound.
    assert 0 < neurons["count"] <= round(0.01 * model["n_layers"] * model["d_mlp"])


def test_demo_saved_set_matches(demo_out, results):
    saved = PrivacyNeurons.load(demo_out / "neurons")
    assert saved.count == results["privacy_neurons"]["count"]
    assert saved.by_layer() == results["privacy_neurons"]["by_layer"]


def test_demo_headline_metrics(results):
    metrics = results["metrics"]
    for entry in ("clean", "ablated"):
        for key in HEADLINE:
            assert key in metrics[entry], f"metrics.{entry} lacks {key}"
    for method in BASELINES:
        missing = set(metrics["ablated"]) - set(metrics["baselines"][method])
        assert missing == set(), f"metrics.baselines.{method} lacks {sorted(missing)}"


def test_demo_memorized_before_localizing(results):
    memorization = results["memorization"]
    for key in ("steps", "wall_time_s", "extraction_exact"):
        assert key in memorization
    assert memorization["extraction_exact"] >= 0.5
    assert results["metrics"]["clean"]["extraction_exact"] >= 0.5


def test_demo_baselines_match_size(results):
    learned = results["privacy_neurons"]["count"]
    for method in BASELINES:
        assert results["privacy_neurons"]["baselines"][method]["count"] == learned, method


def test_demo_jaccard_matrix(results):
    jaccard = results["specificity"]["jaccard"]
    assert set(jaccard) == set(TYPES)
    for a in TYPES:
        assert set(jaccard[a]) == set(TYPES)
        assert jaccard[a][a] == pytest.approx(1.0)
        for b in TYPES:
            assert 0.0 <= jaccard[a][b] <= 1.0
            assert jaccard[a][b] == pytest.approx(jaccard[b][a])


def test_demo_timing_and_memory(results):
    for stage in DEMO_STAGES:
        assert results["timing"][stage] >= 0.0, stage
        assert results["cpu_time"][stage] >= 0.0, stage
        assert results["memory"][stage]["peak_rss_mib"] > 0, stage
    assert results["timing"]["total"] == pytest.approx(
        sum(v for k, v in results["timing"].items() if k != "total")
    )


def test_demo_examples(results):
    examples = results["examples"]
    assert {example["type"] for example in examples} == set(TYPES)
    for example in examples:
        for key in ("prefix", "clean", "ablated", "clean_exact", "ablated_exact"):
            assert key in example


def test_demo_config_recorded(results):
    assert results["config"]["budget"] == 0.01
    assert results["config"]["model"] == "tiny"
    assert results["show_pii"] is False


def test_demo_redacts_pii(demo_out):
    corpus = generate_corpus(SyntheticCorpusConfig(n_people=32, n_heldout_people=16, seed=0))
    pii = {s for record in [*corpus.train, *corpus.heldout] for s in record.pii_strings()}
    texts = {
        "results.json": (demo_out / "results.json").read_text(encoding="utf-8"),
        "report.html": (demo_out / "report.html").read_text(encoding="utf-8"),
        "log": _demo["stderr"],
        "stdout": _demo["stdout"],
    }
    for name, text in texts.items():
        leaked = sorted(value for value in pii if value in text)
        assert leaked == [], f"{name} shows PII: {leaked[:5]}"
    assert "[EMAIL]" in texts["report.html"]


def test_demo_report_is_offline(demo_out):
    from tests.test_report import remote_references

    assert remote_references((demo_out / "report.html").read_text(encoding="utf-8")) == []


def test_demo_prints_headline_table(demo_out):
    lines = _demo["stdout"].splitlines()
    assert lines[0].split() == ["neurons", "extraction", "exposure", "MRR", "general", "ppl"]
    labels = [line.split()[0] for line in lines[1:7]]
    assert labels == ["clean", "ablated", *BASELINES]


def test_demo_logs_one_line_per_stage(demo_out):
    for stage in DEMO_STAGES:
        assert sum(line.startswith(f"[{stage}] ") for line in _demo["stderr"].splitlines()) == 1


def test_demo_wall_time(demo_out, results):
    # results["timing"]["total"] leaves out the imports; this is the whole command.
    wall, cpu = _demo["seconds"], results["cpu_time"]["total"]
    print(f"tiny demo: {wall:.1f} s wall, {cpu:.1f} s CPU (goal {DEMO_GOAL_S} s)")
    assert wall < DEMO_LIMIT_S


def test_report_command_rerenders(demo_out, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_out, copy)
    (copy / "report.html").unlink()
    assert main(["report", str(copy), "--quiet"]) == 0
    rendered = (copy / "report.html").read_text(encoding="utf-8")
    assert rendered == (demo_out / "report.html").read_text(encoding="utf-8")


# ---- stages and helpers ----


def test_staged_output_replaces_on_success(tmp_path):
    out = tmp_path / "out"
    with staged_output(out) as folder:
        (folder / "results.json").write_text("{}")
        assert not out.exists()
    assert (out / "results.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staged_output_cleans_up_on_error(tmp_path):
    out = tmp_path / "new" / "nested" / "out"
    with pytest.raises(RuntimeError):
        with staged_output(out) as folder:
            (folder / "results.json").write_text("{}")
            raise RuntimeError("stage failed")
    assert list(tmp_path.iterdir()) == []


def test_staged_output_keeps_earlier_output_on_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}')
    with pytest.raises(RuntimeError):
        with staged_output(out):
            raise RuntimeError("stage failed")
    assert (out / "results.json").read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stage_recorder_records_time_and_memory(caplog):
    recorder = StageRecorder()
    with caplog.at_level("INFO", logger="tl_privacy"):
        with recorder.stage("work") as stage:
            sum(range(10_000))
            stage.summary("did work")
    assert recorder.timing["work"] >= 0.0
    assert recorder.memory["work"]["peak_rss_mib"] > 0
    assert recorder.memory["work"]["peak_increase_mib"] >= 0
    assert any(r.getMessage().startswith("[work] did work (") for r in caplog.records)


@pytest.mark.parametrize("budget", [0.0, 1.0, 1.5, -0.1])
def test_validate_rejects_budget(tmp_path, budget):
    with pytest.raises(InputError, match="--budget"):
        validate(RunConfig(out=tmp_path / "out", model="tiny", budget=budget), "demo")


def test_validate_rejects_unknown_model(tmp_path):
    with pytest.raises(InputError, match="unknown model"):
        validate(RunConfig(out=tmp_path / "o", model="gpt-17", data=tmp_path), "localize")


def test_validate_rejects_foreign_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    with pytest.raises(InputError, match=r"did not write \(thesis.tex\)"):
        validate(RunConfig(out=out, model="tiny"), "demo")


def test_validate_accepts_earlier_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    validate(RunConfig(out=out, model="tiny"), "demo")


def test_choose_examples_prefers_changed_items():
    def pair(pii_type, record, clean, ablated):
        row = {"type": pii_type, "record_index": record}
        return {**row, "exact": clean}, {**row, "exact": ablated}

    pairs = [
        pair("NAME", 0, True, True),
        pair("NAME", 1, True, False),
        pair("EMAIL", 0, False, False),
        pair("EMAIL", 1, True, True),
        pair("EMAIL", 2, True, True),
    ]
    chosen = choose_examples(pairs, per_type=1)
    assert [(c["type"], c["record_index"]) for c, _ in chosen] == [("NAME", 1), ("EMAIL", 1)]


def test_choose_examples_distinct_records():
    pairs = [({"type": "NAME", "record_index": 0, "exact": True}, {"exact": False})] * 3
    assert len(choose_examples(pairs, per_type=2)) == 1


def test_headline_table_lists_rows():
    values = {"extraction_exact": 0.5, "exposure_mean": 3.0, "mrr": 0.25, "perplexity_general": 9}
    table = headline_table(
        {
            "metrics": {"clean": values, "ablated": values, "baselines": {"random": values}},
            "privacy_neurons": {"count": 7, "baselines": {"random": {"count": 7}}},
        }
    )
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["clean", "ablated", "random"]
    assert "50.0%" in lines[1]


def test_report_renders_localize_results():
    document = render_report(
        {
            "model": {"name": "m", "n_layers": 2, "d_mlp": 8},
            "privacy_neurons": {"count": 2, "fraction": 0.125, "by_layer": [1, 1]},
            "metrics": {"clean": {"extraction_exact": 1.0}, "ablated": {"extraction_exact": 0.0}},
        }
    )
    assert "100.0%" in document
    assert "<img" in document


def test_empty_set_baselines_reuse_clean(tmp_path):
    from types import SimpleNamespace

    import torch

    from tl_privacy.localization import LocalizationConfig
    from tl_privacy.pipeline import evaluate_baselines, start_run

    run = start_run(RunConfig(out=tmp_path / "out", model="tiny", show_progress=False), "demo")
    run.neurons = PrivacyNeurons(mask=torch.zeros(2, 4, dtype=torch.bool))
    run.localization_config = LocalizationConfig()
    run.results["privacy_neurons"] = {"count": 0}
    row = {"pii": "Dana Whitfield", "decoded": "Dana Whitfield", "exact": True}
    clean = {"extraction_exact": 0.9, "items": [row]}
    run.evaluations = {"clean": SimpleNamespace(to_dict=lambda: clean)}

    evaluate_baselines(run)

    for method in BASELINES:
        assert run.results["metrics"]["baselines"][method] == {
            "extraction_exact": 0.9,
            "items": [{"exact": True}],
        }
        assert run.results["privacy_neurons"]["baselines"][method]["count"] == 0


def test_cross_ablation_diagonal_order(tiny_model, tiny_tokenizer, synthetic_corpus):
    import torch

    from tl_privacy.data.tokenization import pii_items
    from tl_privacy.extraction import exact_match_teacher_forced
    from tl_privacy.pipeline import cross_ablation_teacher_forced

    records = synthetic_corpus.train[:4]
    generator = torch.Generator().manual_seed(0)
    sets = {
        name: PrivacyNeurons.from_scores(torch.rand(2, 512, generator=generator), 5, "random")
        for name in ("PHONE", "EMAIL")
    }
    result = cross_ablation_teacher_forced(tiny_model, tiny_tokenizer, records, sets)
    assert list(result) == ["none", "PHONE", "EMAIL"]
    for row in result.values():
        assert list(row) == ["PHONE", "EMAIL", "NAME", "ADDRESS"]
        assert all(0.0 <= value <= 1.0 for value in row.values())

    # The records' pass decides exact match as prefix-by-prefix teacher forcing does.
    items = pii_items(tiny_tokenizer, records)
    hooks = sets["PHONE"].ablation_hooks()
    exact = exact_match_teacher_forced(tiny_model, items, fwd_hooks=hooks).float()
    phone = [i for i, item in enumerate(items) if item.type == "PHONE"]
    assert result["PHONE"]["PHONE"] == pytest.approx(float(exact[phone].mean()))
