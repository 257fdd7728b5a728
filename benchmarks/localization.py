"""Compare every way of picking privacy neurons at several budgets on one memorized model.

The methods are the learned hard-concrete masks (:func:`tl_privacy.localization.localize`)
and the baselines random, activation difference, integrated gradients (joint mode, or
per layer as in DEPN, Wu et al., EMNLP 2023) and slimming
(:func:`tl_privacy.baselines.select`). Each budget is a fraction of all MLP neurons. Every
set is zero-ablated and evaluated with :func:`tl_privacy.evaluation.evaluate`, next to the
clean model, on the demo's synthetic corpus and memorized model (the same pipeline stages
as ``tl-privacy demo``, so memorization comes from the on-disk cache).

Cost control:

- random, activation and integrated gradients score each neuron independently of the
  budget, so each scores once and every budget takes its top k;
- the learned masks and slimming depend on the budget: ``--train-per-budget`` trains one
  run per budget, ``--rank-from-largest`` trains once at the largest budget and ranks the
  same run's scores for the smaller ones;
- identical neuron sets are evaluated once.

The table goes to section ``localization-<model>`` of ``docs/benchmarks.md`` and to stdout,
followed by a summary line on the passes of the learned masks against integrated gradients.
The last line printed is one JSON object with the table's numbers.

Usage: python benchmarks/localization.py [--model tiny|smollm2-135m] [--budgets 0.001,0.01]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from _markdown import DOC, markdown_table, write_section

from tl_privacy.allocator import keep_freed_memory
from tl_privacy.baselines import BaselineConfig, select
from tl_privacy.evaluation import EvaluationResult, evaluate
from tl_privacy.localization import LocalizationConfig, localize
from tl_privacy.neurons import PrivacyNeurons
from tl_privacy.pipeline import (
    DEFAULT_STEPS,
    DEMO_MODELS,
    SMOLLM2,
    TINY,
    Run,
    RunConfig,
    evaluation_config,
    load_demo_data,
    load_run_model,
    memorize_records,
    prepare_batches,
    start_run,
)

logger = logging.getLogger("tl_privacy")

DEFAULT_BUDGETS = (0.001, 0.005, 0.01, 0.02)
DEFAULT_CANDIDATES = {TINY: 10, SMOLLM2: 100}
# A SmolLM2 localization run takes minutes on a CPU, so by default it trains only once.
DEFAULT_MODE = {TINY: "per_budget", SMOLLM2: "from_largest"}
SUMMARY_BUDGET = 0.01

LEARNED = "hard_concrete"
SHARED_SCORE_METHODS = ("random", "activation", "integrated_gradients")
IG_PER_LAYER = "integrated_gradients_per_layer"
LABELS = {
    LEARNED: "hard-concrete masks (learned)",
    "random": "random",
    "activation": "activation difference",
    "integrated_gradients": "integrated gradients (joint)",
    "slimming": "slimming",
    IG_PER_LAYER: "integrated gradients (per layer, DEPN)",
}

Mode = Literal["per_budget", "from_largest"]


@dataclass
class Options:
    """Settings of one benchmark run.

    Attributes:
        model: ``"tiny"`` or ``"smollm2-135m"``.
        budgets: neuron budgets as fractions of all MLP neurons, ascending.
        steps: localization and slimming steps; None takes the pipeline's default.
        candidates: exposure and MRR candidates per PII item; None takes the default.
        extraction: ``"greedy"`` or ``"teacher_forced"`` exact extraction.
        precision: autocast of localization, baselines and evaluation.
        mode: ``"per_budget"`` trains the learned masks and slimming once per budget,
            ``"from_largest"`` once at the largest budget; None takes the model's default.
        run_per_layer_ig: also run integrated gradients in DEPN's per-layer mode.
        seed: seed of the corpus, the tiny model, the gates and the random baseline.
        n_people: people in the synthetic corpus.
        general_text_tokens: general-text tokens for perplexity; None uses all of it.
        show_progress: show tqdm bars.
    """

    model: str = TINY
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    steps: int | None = None
    candidates: int | None = None
    extraction: Literal["greedy", "teacher_forced"] = "greedy"
    precision: str = "auto"
    mode: Mode | None = None
    run_per_layer_ig: bool = False
    seed: int = 0
    n_people: int = 32
    general_text_tokens: int | None = None
    show_progress: bool = False

    def __post_init__(self) -> None:
        if self.model not in DEMO_MODELS:
            raise ValueError(f"--model must be one of {', '.join(DEMO_MODELS)}, got {self.model!r}")
        if not self.budgets:
            raise ValueError("--budgets is empty; give fractions such as 0.001,0.01")
        for budget in self.budgets:
            if not 0.0 < budget < 1.0:
                raise ValueError(
                    f"every budget must be a fraction strictly between 0 and 1 (0.01 = 1%), "
                    f"got {budget}"
                )
        self.budgets = tuple(sorted(set(self.budgets)))
        if self.steps is None:
            self.steps = DEFAULT_STEPS[self.model]
        if self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if self.candidates is None:
            self.candidates = DEFAULT_CANDIDATES[self.model]
        if self.candidates < 0:
            raise ValueError(f"--candidates must be >= 0 (0 skips exposure), got {self.candidates}")
        if self.n_people < 1:
            raise ValueError(f"--people must be at least 1, got {self.n_people}")
        if self.general_text_tokens is not None and self.general_text_tokens < 2:
            raise ValueError(
                f"--general-text-tokens must be at least 2, got {self.general_text_tokens}"
            )
        if self.mode is None:
            self.mode = DEFAULT_MODE[self.model]
        if self.mode not in ("per_budget", "from_largest"):
            raise ValueError(f"mode must be 'per_budget' or 'from_largest', got {self.mode!r}")


@dataclass
class Selection:
    """One method's neuron set at one budget, with the cost of the run that produced it.

    ``run_id`` names that run; rows with the same ``run_id`` share one run, whose time and
    passes count once.
    """

    method: str
    budget: float
    budget_neurons: int
    neurons: PrivacyNeurons
    run_id: str
    seconds: float
    forward_passes: int
    backward_passes: int


@dataclass
class Benchmark:
    """Everything one run measured: the sets, their evaluations and the clean model's."""

    options: Options
    n_layers: int
    n_neurons: int
    clean: EvaluationResult
    selections: list[Selection] = field(default_factory=list)
    evaluations: list[EvaluationResult] = field(default_factory=list)
    ig_per_layer_computed: dict[str, Any] | None = None
    seconds: float = 0.0


# ---- setup ----


def prepare_run(options: Options) -> Run:
    """Build the demo's corpus, model, memorization and batches through the pipeline."""
    config = RunConfig(
        model=options.model,
        steps=options.steps,
        seed=options.seed,
        n_people=options.n_people,
        n_candidates=options.candidates,
        precision=options.precision,
        show_progress=options.show_progress,
    )
    run = start_run(config, "benchmark")
    load_demo_data(run)
    load_run_model(run)
    memorize_records(run)
    prepare_batches(run)
    return run


def localization_settings(run: Run, options: Options, budget: float) -> LocalizationConfig:
    """Return the pipeline's localization settings at ``budget``."""
    return LocalizationConfig(
        steps=options.steps,
        budget=budget,
        seed=options.seed,
        batch_size=run.config.batch_size,
        type_names=tuple(run.results["data"]["type_names"]),
        precision=options.precision,
        show_progress=options.show_progress,
    )


def budget_neurons(budget: float, n_neurons: int) -> int:
    """Return the neuron count of a fractional budget, rounded as the localizer rounds it."""
    return LocalizationConfig(budget=budget).budget_count(n_neurons)


# ---- selection ----


def _selection(
    method: str, budget: float, k: int, neurons: PrivacyNeurons, run_id: str
) -> Selection:
    return Selection(
        method=method,
        budget=budget,
        budget_neurons=k,
        neurons=neurons,
        run_id=run_id,
        seconds=float(neurons.stats["wall_time_s"]),
        forward_passes=int(neurons.stats["forward_passes"]),
        backward_passes=int(neurons.stats["backward_passes"]),
    )


def learned_selections(run: Run, options: Options, n_neurons: int) -> list[Selection]:
    """Localize with the hard-concrete masks at every budget.

    In ``from_largest`` mode one run at the largest budget serves all budgets. Its
    ``"sufficient"`` rule keeps the smallest prefix ``k*`` of the gate ranking that meets the
    exact-match goal. At a smaller budget of ``k`` neurons the same rule would keep the top
    ``min(k*, k)``, because its binary search assumes that longer prefixes never leak more.
    """
    selections = []
    if options.mode == "per_budget":
        for budget in options.budgets:
            settings = localization_settings(run, options, budget)
            neurons = localize(run.model, _objective_data(run), settings, model_name=run.model_name)
            k = budget_neurons(budget, n_neurons)
            selections.append(_selection(LEARNED, budget, k, neurons, f"{LEARNED}@{budget}"))
        return selections

    largest = options.budgets[-1]
    settings = localization_settings(run, options, largest)
    trained = localize(run.model, _objective_data(run), settings, model_name=run.model_name)
    for budget in options.budgets:
        k = budget_neurons(budget, n_neurons)
        neurons = trained if k >= trained.count else trained.top_k(k)
        selections.append(_selection(LEARNED, budget, k, neurons, f"{LEARNED}@{largest}"))
    return selections


def baseline_selections(
    run: Run, options: Options, method: str, n_neurons: int, config: BaselineConfig
) -> list[Selection]:
    """Select ``method``'s neurons at every budget, scoring once where the budget allows.

    Slimming's L1 penalty scales with the budget, so in ``per_budget`` mode it trains once
    per budget. Every other case scores once at the largest budget and takes the top k.
    """
    ks = {budget: budget_neurons(budget, n_neurons) for budget in options.budgets}
    per_budget = method == "slimming" and options.mode == "per_budget"
    data = _objective_data(run) if method == "slimming" else run.batches
    if per_budget:
        selections = []
        for budget, k in ks.items():
            neurons = select(method, run.model, data, k, seed=options.seed, config=config)
            selections.append(_selection(method, budget, k, neurons, f"{method}@{budget}"))
        return selections

    largest = options.budgets[-1]
    scored = select(method, run.model, data, ks[largest], seed=options.seed, config=config)
    return [
        _selection(method, budget, k, scored.top_k(k), f"{method}@{largest}")
        for budget, k in ks.items()
    ]


def _objective_data(run: Run) -> list:
    """Return the batches of the objective-based methods: the records plus the keep-only
    batches of the shipped essays, as the demo gives them (``RunConfig.keep_text``)."""
    return [*run.batches, *run.keep_batches]


def per_layer_ig_passes(joint: Selection, n_layers: int) -> dict[str, int]:
    """Return the passes DEPN's per-layer integrated gradients would take, from a joint run.

    A joint run takes one clean forward pass per batch plus one forward and one backward
    pass per Riemann step and batch. Per-layer mode repeats the Riemann steps for each
    layer and keeps one clean pass per batch (``tl_privacy.baselines``, ``ig_mode``).
    """
    clean_passes = joint.forward_passes - joint.backward_passes
    return {
        "forward_passes": clean_passes + n_layers * joint.backward_passes,
        "backward_passes": n_layers * joint.backward_passes,
    }


# ---- evaluation ----


class Evaluator:
    """Evaluates neuron sets under one config, once per distinct set."""

    def __init__(self, run: Run, options: Options) -> None:
        self.run = run
        self.config = dataclasses.replace(
            evaluation_config(run),
            extraction=options.extraction,
            general_text_tokens=options.general_text_tokens,
        )
        self._results: dict[bytes, EvaluationResult] = {}

    def clean(self) -> EvaluationResult:
        """Evaluate the model with no neuron ablated."""
        return self._evaluate([], key=b"clean")

    def ablated(self, neurons: PrivacyNeurons) -> EvaluationResult:
        """Evaluate the model with ``neurons`` zero-ablated; an empty set is the clean model."""
        if neurons.count == 0:
            return self.clean()
        key = neurons.mask.numpy().tobytes()
        return self._evaluate(neurons.ablation_hooks(), key=key)

    def _evaluate(self, hooks: list, key: bytes) -> EvaluationResult:
        if key not in self._results:
            run = self.run
            self._results[key] = evaluate(
                run.model,
                run.tokenizer,
                run.train,
                run.heldout,
                fwd_hooks=hooks,
                config=self.config,
            )
        return self._results[key]


# ---- the benchmark ----


def run_benchmark(options: Options, run: Run | None = None) -> Benchmark:
    """Select every method's sets at every budget and evaluate them and the clean model.

    ``run`` is a prepared pipeline run (:func:`prepare_run`); None prepares one.
    """
    started = time.perf_counter()
    run = run or prepare_run(options)
    n_layers = run.results["model"]["n_layers"]
    n_neurons = run.results["model"]["n_neurons"]
    largest = localization_settings(run, options, options.budgets[-1])
    baseline_config = BaselineConfig.from_localization(largest, show_progress=options.show_progress)

    evaluator = Evaluator(run, options)
    benchmark = Benchmark(options, n_layers, n_neurons, clean=evaluator.clean())
    logger.info("benchmark: clean model evaluated in %.1f s", benchmark.clean.seconds)

    selections = learned_selections(run, options, n_neurons)
    for method in (*SHARED_SCORE_METHODS, "slimming"):
        selections += baseline_selections(run, options, method, n_neurons, baseline_config)
    if options.run_per_layer_ig:
        per_layer = dataclasses.replace(baseline_config, ig_mode="per_layer")
        for selection in baseline_selections(
            run, options, "integrated_gradients", n_neurons, per_layer
        ):
            selection.method = IG_PER_LAYER
            selection.run_id = selection.run_id.replace("integrated_gradients", IG_PER_LAYER)
            selections.append(selection)
    else:
        joint = next(s for s in selections if s.method == "integrated_gradients")
        benchmark.ig_per_layer_computed = per_layer_ig_passes(joint, n_layers)

    for selection in selections:
        evaluation = evaluator.ablated(selection.neurons)
        benchmark.selections.append(selection)
        benchmark.evaluations.append(evaluation)
        logger.info(
            "benchmark: %s at %s, %d neurons, exact extraction %.3f",
            selection.method,
            _percent(selection.budget),
            selection.neurons.count,
            evaluation.extraction_exact,
        )
    benchmark.seconds = time.perf_counter() - started
    return benchmark


# ---- output ----

HEADER = [
    "method",
    "budget (neurons)",
    "selected",
    "exact extraction",
    "exposure (bits)",
    "MRR",
    "general ppl change (%)",
    "selection time (s)",
    "forward passes",
    "backward passes",
]
SAME_RUN = "same run"


def ppl_change_percent(clean: EvaluationResult, edited: EvaluationResult) -> float:
    """Return the relative change of general-text perplexity, in percent."""
    return 100.0 * (edited.perplexity_general - clean.perplexity_general) / clean.perplexity_general


def table_rows(benchmark: Benchmark) -> list[list[object]]:
    """Return the table's rows: the clean model, then each method at each budget.

    A run shared by several rows shows its time and passes on its first row only.
    """
    clean = benchmark.clean
    rows: list[list[object]] = [
        [
            "clean model (no ablation)",
            "–",
            0,
            clean.extraction_exact,
            clean.exposure_mean,
            clean.mrr,
            0.0,
            None,
            None,
            None,
        ]
    ]
    reported_runs: set[str] = set()
    for selection, evaluation in zip(benchmark.selections, benchmark.evaluations, strict=True):
        first = selection.run_id not in reported_runs
        reported_runs.add(selection.run_id)
        cost = (
            [selection.seconds, selection.forward_passes, selection.backward_passes]
            if first
            else [SAME_RUN] * 3
        )
        rows.append(
            [
                LABELS[selection.method],
                f"{_percent(selection.budget)} ({selection.budget_neurons})",
                selection.neurons.count,
                evaluation.extraction_exact,
                evaluation.exposure_mean,
                evaluation.mrr,
                ppl_change_percent(clean, evaluation),
                *cost,
            ]
        )
    if benchmark.ig_per_layer_computed is not None:
        passes = benchmark.ig_per_layer_computed
        rows.append(
            [
                f"{LABELS[IG_PER_LAYER]}: computed, not run",
                "any",
                None,
                None,
                None,
                None,
                None,
                None,
                passes["forward_passes"],
                passes["backward_passes"],
            ]
        )
    return rows


def notes(benchmark: Benchmark, run_config: dict[str, Any]) -> str:
    """Return the notes under the table: what was run, and how the cost was controlled."""
    options = benchmark.options
    mode = (
        "`--train-per-budget`: the learned masks and slimming were trained once per budget"
        if options.mode == "per_budget"
        else "`--rank-from-largest`: the learned masks and slimming were trained once, at the "
        f"largest budget ({_percent(options.budgets[-1])}), and the smaller budgets take the "
        "top of the same ranking (the learned masks keep at most the largest run's set)"
    )
    general = (
        "all of the general text"
        if options.general_text_tokens is None
        else f"the first {options.general_text_tokens} tokens of the general text"
    )
    exposure_limit = (
        "Exposure and MRR were skipped (0 candidates)."
        if options.candidates == 0
        else f"With {options.candidates} candidates exposure is at most "
        f"log2({options.candidates} + 1) = {math.log2(options.candidates + 1):.2f} bits, "
        "and MRR at most 1."
    )
    lines = [
        f"Model `{options.model}`: {benchmark.n_layers} layers, {benchmark.n_neurons} MLP "
        f"neurons; {run_config['n_train']} training records with {run_config['n_items']} PII "
        f"items, memorized to {_fraction(run_config['memorized'])} exact extraction.",
        f"Localization and slimming: {options.steps} steps; integrated gradients: "
        f"{run_config['ig_steps']} Riemann steps. Evaluation: {options.candidates} candidates "
        f"per PII item for exposure and MRR, {options.extraction} extraction, precision "
        f"`{options.precision}` (resolved to {run_config['precision']}); perplexity change on "
        f"{general}, relative to the clean model. {exposure_limit}",
        f"Cost control: random, activation and integrated gradients scored every neuron once, "
        f"and each budget takes the top k of those scores, so their time and passes count once "
        f'("{SAME_RUN}" in the later rows). {mode}. Identical sets were evaluated once.',
        '"selected" can be below the budget for the learned masks: they keep the smallest '
        "prefix of the gate ranking that cuts teacher-forced exact match by 90% "
        '(`selection="sufficient"`). Passes are forward and backward passes of one batch, '
        "counted by the library (`neurons.stats`), including the learned masks' selection "
        "passes and the KL reference passes.",
    ]
    if benchmark.ig_per_layer_computed is not None:
        lines.append(
            "The per-layer integrated gradients row is computed, not run: DEPN's protocol "
            "repeats the joint run's Riemann steps once per layer "
            f"({benchmark.n_layers} layers) and keeps one clean forward pass per batch. Run it "
            "with `--run-per-layer-ig`."
        )
    return "\n\n".join(lines)


def pass_summary(benchmark: Benchmark) -> dict[str, Any]:
    """Compare the learned masks' passes near a 1% budget with integrated gradients'.

    Returns the budget used, both methods' forward and backward passes, and the ratios of
    total passes (forward plus backward). In ``from_largest`` mode the learned run is the
    one at the largest budget.
    """
    budgets = benchmark.options.budgets
    budget = min(budgets, key=lambda b: abs(b - SUMMARY_BUDGET))
    learned = next(s for s in benchmark.selections if s.method == LEARNED and s.budget == budget)
    joint = next(s for s in benchmark.selections if s.method == "integrated_gradients")
    learned_total = learned.forward_passes + learned.backward_passes
    joint_total = joint.forward_passes + joint.backward_passes
    summary = {
        "budget": budget,
        "learned_forward": learned.forward_passes,
        "learned_backward": learned.backward_passes,
        "ig_joint_forward": joint.forward_passes,
        "ig_joint_backward": joint.backward_passes,
        "ratio_learned_to_ig_joint": learned_total / joint_total if joint_total else None,
    }

    per_layer = _per_layer_passes(benchmark)
    if per_layer is not None:
        per_layer_total = per_layer["forward_passes"] + per_layer["backward_passes"]
        summary.update(
            ig_per_layer_forward=per_layer["forward_passes"],
            ig_per_layer_backward=per_layer["backward_passes"],
            ig_per_layer_computed=benchmark.ig_per_layer_computed is not None,
            ratio_learned_to_ig_per_layer=learned_total / per_layer_total
            if per_layer_total
            else None,
        )
    return summary


def _per_layer_passes(benchmark: Benchmark) -> dict[str, int] | None:
    if benchmark.ig_per_layer_computed is not None:
        return benchmark.ig_per_layer_computed
    ran = [s for s in benchmark.selections if s.method == IG_PER_LAYER]
    if not ran:
        return None
    return {"forward_passes": ran[0].forward_passes, "backward_passes": ran[0].backward_passes}


def summary_line(summary: dict[str, Any]) -> str:
    """Return the pass comparison as one sentence."""
    line = (
        f"Learned masks at {_percent(summary['budget'])}: {summary['learned_forward']} forward "
        f"and {summary['learned_backward']} backward passes; integrated gradients (joint): "
        f"{summary['ig_joint_forward']} and {summary['ig_joint_backward']}; ratio of total "
        f"passes {_ratio(summary['ratio_learned_to_ig_joint'])}."
    )
    if "ig_per_layer_forward" in summary:
        source = "computed" if summary["ig_per_layer_computed"] else "run"
        line += (
            f" Integrated gradients per layer ({source}): {summary['ig_per_layer_forward']} and "
            f"{summary['ig_per_layer_backward']}; ratio "
            f"{_ratio(summary['ratio_learned_to_ig_per_layer'])}."
        )
    return line


def to_json(benchmark: Benchmark, summary: dict[str, Any]) -> dict[str, Any]:
    """Return the table's numbers as one JSON-ready object."""
    options = benchmark.options
    clean = benchmark.clean
    rows = []
    for selection, evaluation in zip(benchmark.selections, benchmark.evaluations, strict=True):
        rows.append(
            {
                "method": selection.method,
                "budget": selection.budget,
                "budget_neurons": selection.budget_neurons,
                "selected": selection.neurons.count,
                "extraction_exact": evaluation.extraction_exact,
                "exposure_mean": evaluation.exposure_mean,
                "mrr": evaluation.mrr,
                "perplexity_general": evaluation.perplexity_general,
                "perplexity_general_change_pct": ppl_change_percent(clean, evaluation),
                "run_id": selection.run_id,
                "selection_seconds": selection.seconds,
                "forward_passes": selection.forward_passes,
                "backward_passes": selection.backward_passes,
                "evaluation_seconds": evaluation.seconds,
            }
        )
    return {
        "benchmark": "localization",
        "model": options.model,
        "n_layers": benchmark.n_layers,
        "n_neurons": benchmark.n_neurons,
        "budgets": list(options.budgets),
        "mode": options.mode,
        "steps": options.steps,
        "candidates": options.candidates,
        "extraction": options.extraction,
        "precision": options.precision,
        "clean": {
            "extraction_exact": clean.extraction_exact,
            "exposure_mean": clean.exposure_mean,
            "mrr": clean.mrr,
            "perplexity_general": clean.perplexity_general,
            "evaluation_seconds": clean.seconds,
        },
        "rows": rows,
        "ig_per_layer_computed": benchmark.ig_per_layer_computed,
        "summary": summary,
        "seconds": benchmark.seconds,
    }


def run_facts(run: Run, options: Options) -> dict[str, Any]:
    """Return the facts about the run that the notes state."""
    from tl_privacy.precision import resolve_precision

    config = BaselineConfig()
    return {
        "n_train": len(run.train),
        "n_items": len(run.items),
        "memorized": run.results.get("memorization", {}).get("extraction_exact"),
        "ig_steps": config.ig_steps,
        "precision": resolve_precision(run.model, options.precision),
    }


def report(benchmark: Benchmark, run: Run, doc: Path = DOC) -> dict[str, Any]:
    """Write section ``localization-<model>`` of ``doc``, print it, and return the JSON object."""
    summary = pass_summary(benchmark)
    table = markdown_table(HEADER, table_rows(benchmark))
    line = summary_line(summary)
    body = f"{table}\n\n{line}\n\n{notes(benchmark, run_facts(run, benchmark.options))}\n"
    title = f"Localization methods at several budgets: {benchmark.options.model}"
    write_section(f"localization-{benchmark.options.model}", title, body, doc=doc)
    print(table)
    print()
    print(line)
    result = to_json(benchmark, summary)
    print(json.dumps(result))
    return result


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# ---- command line ----


def parse_budgets(text: str) -> tuple[float, ...]:
    """Parse a comma-separated list of fractions such as ``0.001,0.01``."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--budgets must be comma-separated fractions such as 0.001,0.01, got {text!r}"
        ) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    parser.add_argument("--model", choices=DEMO_MODELS, default=TINY, help="model (default: tiny)")

    parser.add_argument(
        "--budgets",
        type=parse_budgets,
        default=DEFAULT_BUDGETS,
        help="neuron budgets as fractions of all MLP neurons (default: 0.001,0.005,0.01,0.02)",
    )

    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="localization and slimming steps (default: the pipeline's, "
        + ", ".join(f"{m} {s}" for m, s in DEFAULT_STEPS.items())
        + ")",
    )

    parser.add_argument(
        "--candidates",
        type=int,
        default=None,
        help="exposure and MRR candidates per PII item (default: tiny 10, smollm2-135m 100)",
    )

    parser.add_argument(
        "--extraction",
        choices=("greedy", "teacher_forced"),
        default="greedy",
        help="how exact extraction is measured (default: greedy)",
    )

    parser.add_argument(
        "--precision",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="autocast of localization, baselines and evaluation (default: auto)",
    )

    mode = parser.add_mutually_exclusive_group()

    mode.add_argument(
        "--train-per-budget",
        dest="mode",
        action="store_const",
        const="per_budget",
        help="train the learned masks and slimming once per budget (default for tiny)",
    )

    mode.add_argument(
        "--rank-from-largest",
        dest="mode",
        action="store_const",
        const="from_largest",
        help="train them once at the largest budget and rank for the smaller ones "
        "(default for smollm2-135m)",
    )

    parser.add_argument(
        "--run-per-layer-ig",
        action="store_true",
        help="also run integrated gradients per layer (DEPN), at n_layers times the passes; "
        "by default its passes are computed from the joint run",
    )

    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the corpus, the tiny model, the gates and the random baseline (default: 0)",
    )

    parser.add_argument(
        "--people", type=int, default=32, help="people in the synthetic corpus (default: 32)"
    )

    parser.add_argument(
        "--general-text-tokens",
        type=int,
        default=None,
        help="general-text tokens for perplexity (default: all, about 5,500 SmolLM2 tokens)",
    )

    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )

    parser.add_argument(
        "--doc",
        type=Path,
        default=DOC,
        help="markdown file to write the section into (default: docs/benchmarks.md)",
    )

    parser.add_argument("--progress", action="store_true", help="show progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        options = Options(
            model=args.model,
            budgets=args.budgets,
            steps=args.steps,
            candidates=args.candidates,
            extraction=args.extraction,
            precision=args.precision,
            mode=args.mode,
            run_per_layer_ig=args.run_per_layer_ig,
            seed=args.seed,
            n_people=args.people,
            general_text_tokens=args.general_text_tokens,
            show_progress=args.progress,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    run = prepare_run(options)
    report(run_benchmark(options, run), run, doc=args.doc)


if __name__ == "__main__":
    # The allocator settings of the tl-privacy command, so that the times match its runs.
    keep_freed_memory()
    main()
