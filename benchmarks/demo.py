"""Time the demo pipeline stage by stage and write the numbers to docs/benchmarks.md.

Runs ``tl-privacy demo`` (SmolLM2 by default) into a temporary folder, or reads the
``results.json`` of a finished run with ``--results DIR``, and writes the ``demo-<model>``
section: seconds and peak resident memory per stage, the selection and evaluation seconds
of every neuron set, and the headline table. The wall times include whatever else ran on
the machine, so run it on an otherwise idle one.

Usage: python benchmarks/demo.py [--model smollm2-135m|tiny] [--results DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _markdown import markdown_table, write_section

METRICS = ("extraction_exact", "exposure_mean", "mrr", "perplexity_general")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "tiny"])
    parser.add_argument(
        "--results", type=Path, help="folder of a finished demo run to read instead of running"
    )
    return parser.parse_args()


def run_demo(model: str, out: Path) -> None:
    command = [sys.executable, "-m", "tl_privacy.cli", "demo", "--model", model, "--out", str(out)]
    subprocess.run(command, check=True)


def stage_rows(results: dict) -> list[list[object]]:
    memory = results.get("memory", {})
    rows = []
    for stage, seconds in results["timing"].items():
        peak = memory.get(stage, {}).get("peak_rss_mib")
        rows.append([stage, seconds, peak])
    return rows


def set_rows(results: dict) -> list[list[object]]:
    learned = results["privacy_neurons"]
    metrics = results["metrics"]
    rows = [["clean", 0, None, None, *(metrics["clean"].get(k) for k in METRICS)]]
    rows.append(
        [
            "learned",
            learned["count"],
            results["timing"].get("localize"),
            metrics["ablated"].get("seconds"),
            *(metrics["ablated"].get(k) for k in METRICS),
        ]
    )
    for method, summary in learned.get("baselines", {}).items():
        values = metrics["baselines"][method]
        rows.append(
            [
                method,
                summary["count"],
                summary.get("selection_seconds"),
                summary.get("evaluation_seconds"),
                *(values.get(k) for k in METRICS),
            ]
        )
    return rows


def evaluation_seconds(results: dict) -> float:
    """Seconds spent evaluating neuron sets: the clean and learned evaluations and every
    baseline's evaluation, without the baselines' selection."""
    total = results["timing"].get("evaluate", 0.0)
    for summary in results["privacy_neurons"].get("baselines", {}).values():
        total += summary.get("evaluation_seconds") or 0.0
    return total


def body(results: dict) -> str:
    config = results["config"]
    header = [
        "set",
        "neurons",
        "selection (s)",
        "evaluation (s)",
        "exact extraction",
        "exposure (bits)",
        "MRR",
        "general ppl",
    ]
    return (
        f"Demo run: `tl-privacy {results['command']}` on {results['model']['name']}, "
        f"{results['data']['n_train_records']} training "
        f"records, budget {config['budget']}, {config['n_candidates'] or 'default'} exposure "
        f"candidates, precision {config['precision']}; memorization "
        f"{'cached' if results['memorization'].get('cached') else 'trained in this run'}.\n\n"
        + markdown_table(["stage", "seconds", "peak RSS (MiB)"], stage_rows(results))
        + "\n\n"
        + markdown_table(header, set_rows(results))
        + f"\n\nEvaluation of all neuron sets: {evaluation_seconds(results):.0f} s."
        + heldout_note(results)
    )


def heldout_note(results: dict[str, Any]) -> str:
    """Say how much of the clean evaluation went to held-out exposure, when it was measured."""
    clean = results["metrics"]["clean"]
    if clean.get("heldout_exposure_mean") is None:
        return ""
    return (
        " The run measured held-out exposure (`--heldout-exposure`), which is part of the "
        "clean model's evaluation time: mean "
        f"{clean['heldout_exposure_mean']:.2f} bits over the held-out PII, against "
        f"{clean['exposure_mean']:.2f} for the training PII."
    )


def main() -> None:
    args = parse_args()
    if args.results is None:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "demo"
            run_demo(args.model, out)
            results = json.loads((out / "results.json").read_text())
    else:
        results = json.loads((args.results / "results.json").read_text())
    name = results["model"]["name"]
    write_section(f"demo-{name}", f"Demo pipeline: {name}", body(results))
    print(body(results))
    print(json.dumps({"timing": results["timing"], "evaluation_s": evaluation_seconds(results)}))


if __name__ == "__main__":
    main()
