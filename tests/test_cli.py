"""The tl-privacy command line: help, input errors, and localize/evaluate/report on the fixture."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tl_privacy import cli
from tl_privacy.cache import CACHE_ENV
from tl_privacy.cli import main
from tl_privacy.data.records import load_records
from tl_privacy.neurons import PrivacyNeurons

FIXTURE = Path(__file__).parent / "fixtures" / "records.jsonl"
HEADLINE = ("extraction_exact", "exposure_mean", "mrr", "perplexity_general", "perplexity_heldout")


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``main(args)``; return the exit code, stdout and stderr."""
    try:
        code = main([str(arg) for arg in args])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- help ----


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("demo", ("--model", "--out", "--seed", "--budget", "fraction", "--show-pii", "--steps")),
        ("localize", ("--model", "--data", "--budget", "--steps", "--out", "JSONL", "code points")),
        ("evaluate", ("--model", "--data", "--neurons", "--out", "--heldout")),
        ("report", ("RESULTS_DIR",)),
    ],
)
def test_help_describes_options(command, expected, capsys):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0
    for text in expected:
        assert text in out, f"{command} --help does not mention {text!r}"


def test_help_lists_commands(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for command in ("demo", "localize", "evaluate", "report"):
        assert command in out


def test_budget_help_states_unit(capsys):
    _, out, _ = run_cli(["demo", "--help"], capsys)
    assert "fraction of all MLP neurons" in " ".join(out.split())
    assert "0.01 = 1%" in " ".join(out.split())


# ---- input errors ----


def _bad_records(folder: Path) -> Path:
    path = folder / "bad.jsonl"
    row = {"text": "Call Ann.", "spans": [{"start": 5, "end": 50, "type": "NAME"}]}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    return path


def _model_folder_without_config(folder: Path) -> Path:
    path = folder / "empty-model"
    path.mkdir()
    return path


def _latin1_records(folder: Path) -> Path:
    path = folder / "latin1.jsonl"
    path.write_bytes('{"text": "Caf\u00e9 owner Ann.", "spans": []}\n'.encode("latin-1"))
    return path


BAD_INPUTS = {
    "budget zero": (["demo", "--model", "tiny", "--budget", "0"], "budget"),
    "budget above one": (["demo", "--model", "tiny", "--budget", "1.5"], "budget"),
    "budget not a number": (["demo", "--model", "tiny", "--budget", "lots"], "budget"),
    "unknown demo model": (["demo", "--model", "gpt-17"], "gpt-17"),
    "unknown model": (["localize", "--model", "gpt-17", "--data", FIXTURE], "unknown model"),
    "missing data": (
        ["localize", "--model", "tiny", "--data", "{tmp}/none.jsonl"],
        "does not exist",
    ),
    "invalid records": (["localize", "--model", "tiny", "--data", "{bad}"], "out of range"),
    "model folder without config": (
        ["localize", "--model", "{model_folder}", "--data", FIXTURE],
        "config.json",
    ),
    "missing neurons": (
        ["evaluate", "--model", "tiny", "--data", FIXTURE, "--neurons", "{tmp}/nothing"],
        "neuron set",
    ),
    "steps zero": (["localize", "--model", "tiny", "--data", FIXTURE, "--steps", "0"], "steps"),
    "data not UTF-8": (
        ["localize", "--model", "tiny", "--data", "{latin1}"],
        "is not valid UTF-8 (byte 0xe9",
    ),
    "device unknown": (
        ["localize", "--model", "tiny", "--data", FIXTURE, "--device", "gpu0"],
        "is not a torch device",
    ),
    "too many people": (["demo", "--model", "tiny", "--people", "5000"], "use at most 2384"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_without_output(case, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    replacements = {
        "{tmp}": str(inputs),
        "{bad}": str(_bad_records(inputs)),
        "{model_folder}": str(_model_folder_without_config(inputs)),
        "{latin1}": str(_latin1_records(inputs)),
    }
    args, expected = BAD_INPUTS[case]
    args = [str(arg) for arg in args]
    for key, value in replacements.items():
        args = [arg.replace(key, value) for arg in args]
    out = tmp_path / "runs" / "out"

    code, _, err = run_cli([*args, "--out", out], capsys)

    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tl-privacy")
    assert "error" in lines[0]
    assert expected in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("with_results", [False, True])
def test_foreign_output_folder_is_kept(with_results, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    if with_results:
        (out / "results.json").write_text('{"accuracy": 0.9}')

    code, _, err = run_cli(["demo", "--model", "tiny", "--out", out], capsys)

    assert code == 2
    assert "contains files that tl-privacy did not write (notes.txt)" in err
    assert (out / "notes.txt").read_text() == "mine"


def test_working_folder_rejected_as_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    code, _, err = run_cli(["demo", "--model", "tiny", "--out", "."], capsys)

    assert code == 2
    assert "is the working folder or contains it" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(tmp_path, capsys):
    args = ["localize", "--model", "tiny", "--data", FIXTURE, "--device", "cuda"]

    code, _, err = run_cli([*args, "--out", tmp_path / "out"], capsys)

    assert code == 2
    assert "this machine has no CUDA device" in err


def test_report_without_results(tmp_path, capsys):
    code, _, err = run_cli(["report", tmp_path], capsys)
    assert code == 2
    assert "no results.json" in err


def test_invalid_record_error_hides_pii(tmp_path, capsys):
    # Names are not matched by the redactor's patterns, so only the message itself can hide them.
    path = tmp_path / "records.jsonl"
    text = "Please call Hiroshi Tanabe back today."
    row = {
        "id": "t1",
        "text": text,
        "spans": [{"start": 12, "end": 24, "type": "name", "pii": "Hiroshi Tanabe"}],
    }
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")

    code, _, err = run_cli(
        ["localize", "--model", "tiny", "--data", path, "--out", tmp_path / "out"], capsys
    )

    assert code == 2
    assert "record 0 (id 't1'): span 0 (12, 24, NAME)" in err
    assert "12 characters" in err
    assert "14 characters" in err
    for secret in ("Hiroshi", "Tanabe", "Hiroshi Tana"):
        assert secret not in err


@pytest.mark.parametrize(
    ("content", "missing"),
    [
        ('{"command": "x"}', "'model', 'privacy_neurons', 'metrics'"),
        (
            '{"model": {}, "privacy_neurons": {"count": 1}, "metrics": {"clean": {"x": 1}}}',
            "'model', 'metrics.ablated'",
        ),
        ("[]", "JSON list"),
    ],
)
def test_report_incomplete_results(content, missing, tmp_path, capsys):
    (tmp_path / "results.json").write_text(content, encoding="utf-8")

    code, _, err = run_cli(["report", tmp_path], capsys)

    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(tmp_path / "results.json") in lines[0]
    assert missing in lines[0]
    assert "tl-privacy demo" in lines[0]
    assert "tl-privacy evaluate" in lines[0]
    assert not (tmp_path / "report.html").exists()


def test_missing_command_exits_2(capsys):
    code, _, err = run_cli([], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1


def test_console_script_exit_code(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tl_privacy.cli", "demo", "--budget", "0", "--out", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "--budget" in completed.stderr
    assert not out.exists()


# ---- localize, evaluate and report on the fixture records ----


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory):
    """An empty tl_privacy cache for this module's runs, so the tiny model memorizes once."""
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(scope="module")
def localized(cli_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("localize") / "out"
    code = main(["localize", "--model", "tiny", "--data", str(FIXTURE), "--out", str(out), "-q"])
    assert code == 0
    return out


def test_outputs_follow_the_umask(localized):
    umask = os.umask(0)
    os.umask(umask)

    for folder in (localized, localized / "neurons"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    for file in (localized / "results.json", localized / "neurons" / "neurons.safetensors"):
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask


def test_localize_writes_neurons(localized):
    neurons = PrivacyNeurons.load(localized / "neurons")
    assert neurons.n_layers == 2
    assert neurons.d_mlp == 512
    assert neurons.count <= round(0.01 * 2 * 512)


def test_localize_stores_fingerprint(localized):
    fingerprint = PrivacyNeurons.load(localized / "neurons").model_fingerprint
    assert fingerprint is not None
    assert len(fingerprint) == 64
    int(fingerprint, 16)


def test_localize_results(localized):
    results = json.loads((localized / "results.json").read_text(encoding="utf-8"))
    neurons = PrivacyNeurons.load(localized / "neurons")
    assert results["command"] == "localize"
    assert results["model"]["name"] == "tiny"
    assert results["privacy_neurons"]["count"] == neurons.count
    assert results["privacy_neurons"]["by_layer"] == neurons.by_layer()
    assert results["data"]["n_train_records"] == 20
    assert 0.0 <= results["metrics"]["clean"]["extraction_exact"] <= 1.0
    assert "localize" in results["timing"]
    assert (localized / "report.html").is_file()


def test_evaluate_saved_neurons(localized, tmp_path, capsys):
    out = tmp_path / "evaluation"
    code, stdout, err = run_cli(
        [
            "evaluate", "--model", "tiny", "--data", FIXTURE,
            "--neurons", localized / "neurons", "--out", out, "--show-pii",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    # The tiny model memorizes the same records the same way, so the weights match.
    assert "other weights" not in err
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    for entry in ("clean", "ablated"):
        for key in HEADLINE:
            assert key in results["metrics"][entry], f"metrics.{entry} lacks {key}"
    assert "clean" in stdout.splitlines()[1]

    # --show-pii keeps the PII strings in the examples.
    pii = {s for record in load_records(FIXTURE) for s in record.pii_strings()}
    targets = {example["target"] for example in results["examples"]}
    assert targets and targets <= pii


def test_evaluate_heldout_exposure(localized, tmp_path, capsys):
    text = "Support ticket 4501: Lena Marsh asked for a callback at (313) 555-0177."
    record = {
        "text": text,
        "spans": [
            {"start": 21, "end": 31, "type": "NAME"},
            {"start": 56, "end": 70, "type": "PHONE"},
        ],
    }
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps(record) + "\n", encoding="utf-8")

    out = tmp_path / "evaluation"
    code, _, err = run_cli(
        [
            "evaluate", "--model", "tiny", "--data", FIXTURE, "--heldout", heldout,
            "--neurons", localized / "neurons", "--out", out, "--candidates", "5",
            "--heldout-exposure", "-q",
        ],
        capsys,
    )  # fmt: skip

    assert code == 0, err
    metrics = json.loads((out / "results.json").read_text(encoding="utf-8"))["metrics"]
    # Measured on the clean model only: it is what the context gives away, not memory.
    assert 0.0 <= metrics["clean"]["heldout_exposure_mean"] <= math.log2(6) + 1e-9
    assert metrics["ablated"]["heldout_exposure_mean"] is None
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "Held-out exposure" in report
    assert "Exposure, held-out (never seen)" in report


def test_evaluate_other_weights_warns(localized, tmp_path, capsys):
    import shutil

    # A set found on other weights of the same shape: evaluated, with one warning.
    neurons = tmp_path / "neurons"
    shutil.copytree(localized / "neurons", neurons)
    config_path = neurons / "config.json"
    meta = json.loads(config_path.read_text(encoding="utf-8"))
    # Ten digits in a row: the message must still show the fingerprint, not [PHONE].
    meta["model_fingerprint"] = "0123456789" + "0" * 54
    config_path.write_text(json.dumps(meta), encoding="utf-8")

    out = tmp_path / "evaluation"
    code, _, err = run_cli(
        [
            "evaluate", "--model", "tiny", "--data", FIXTURE, "--neurons", neurons,
            "--out", out, "--candidates", "0", "-q",
        ],
        capsys,
    )  # fmt: skip

    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "localized on other weights" in warnings[0]
    assert "fingerprint 01234567)" in warnings[0]
    assert "'tiny'" in warnings[0]
    assert (out / "results.json").is_file()


def test_report_rerenders(localized, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(localized, copy)
    (copy / "report.html").unlink()
    code, _, err = run_cli(["report", copy], capsys)
    assert code == 0, err
    document = (copy / "report.html").read_text(encoding="utf-8")
    assert document.startswith("<!DOCTYPE html>")
    # A localize run measures exact extraction only, and the report names the command for the rest.
    assert "tl-privacy evaluate --neurons" in document


def test_logs_are_redacted(cli_cache, tmp_path, capsys):
    # Localizing leaves the records' PII out of the log unless --show-pii is given.
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        ["localize", "--model", "tiny", "--data", FIXTURE, "--out", out, "--steps", "20"], capsys
    )
    assert code == 0, err
    assert "[localize]" in err
    pii = {s for record in load_records(FIXTURE) for s in record.pii_strings()}
    assert [value for value in pii if value in err + stdout] == []


def test_sigterm_removes_staging_folder(tmp_path):
    import signal
    import time

    runs = tmp_path / "runs"
    out = runs / "out"
    env = {**os.environ, CACHE_ENV: str(tmp_path / "cache")}
    command = [sys.executable, "-m", "tl_privacy.cli", "demo", "--model", "tiny", "--out", str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (runs.exists() and any(runs.iterdir())):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the demo did not create its staging folder"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 128 + signal.SIGTERM
    assert not runs.exists() or list(runs.iterdir()) == []


def test_main_restores_logging(tmp_path, capsys):
    import logging

    logger = logging.getLogger("tl_privacy")
    before = (list(logger.handlers), logger.propagate, logger.level)
    code, _, _ = run_cli(["report", tmp_path], capsys)
    assert code == 2
    assert (list(logger.handlers), logger.propagate, logger.level) == before


def test_localize_model_folder(tiny_llama_folder, tmp_path, capsys):
    # A Hugging Face folder is used as it is: no tokenizer training and no memorization.
    out = tmp_path / "out"
    args = ["localize", "--model", tiny_llama_folder, "--data", FIXTURE, "--out", out]
    code, _, err = run_cli([*args, "--steps", "5"], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["model"]["name"] == tiny_llama_folder.name
    assert results["model"]["n_layers"] == 2
    assert "memorize" not in results["timing"]
    assert PrivacyNeurons.load(out / "neurons").d_mlp == results["model"]["d_mlp"]


@pytest.mark.parametrize(("setting", "applied"), [(None, True), ("1", True), ("0", False)])
def test_console_script_allocator_setting(monkeypatch, setting, applied):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(cli, "main", lambda: 0)
    if setting is None:
        monkeypatch.delenv(cli.KEEP_FREED_MEMORY_ENV, raising=False)
    else:
        monkeypatch.setenv(cli.KEEP_FREED_MEMORY_ENV, setting)

    with pytest.raises(SystemExit) as stopped:
        cli.console_main()

    assert stopped.value.code == 0
    assert calls == ([True] if applied else [])
