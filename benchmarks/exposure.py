"""Time exposure scoring level by level against the default auto mode, on the demo's model.

Exposure ranks each PII item among same-format candidates, scored as token tries behind
the record's cached forward pass (see ``tl_privacy.metrics``). Two cases:

  - pruning: the memorized model, which prefers the true PII, so most candidates drop out
    after their first token;
  - nothing pruned: ``tie_tolerance`` so large that every candidate stays alive, as for a
    neuron set that makes the true PII unlikely (integrated gradients' set in the demo).
    Every rank is then the worst one; only the time matters.

Each case runs with ``trie_mode="levels"`` (one pass or more per trie level) and with the
default ``"auto"`` (whole tries once they are predicted to be cheaper). Both are exact up
to floating-point rounding, so the ranks should agree but for near-ties.
The table goes into the ``exposure`` section of docs/benchmarks.md (``--no-doc`` leaves the
file alone). The last line printed is one JSON object with the times.

With ``--neurons DIR [DIR ...]`` each saved neuron set adds a case with the set ablated: the
learned set of a demo run, where pruning works only part of the way, or a baseline's set.

Usage: python benchmarks/exposure.py [--candidates 100] [--threads 2] [--neurons DIR ...]
[--no-doc]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from _markdown import markdown_table, write_section

from tl_privacy import pipeline
from tl_privacy.allocator import keep_freed_memory
from tl_privacy.attention import fused_attention
from tl_privacy.metrics import ExposureConfig, exposure_scores
from tl_privacy.neurons import PrivacyNeurons
from tl_privacy.precision import weights_cast_once

NOTHING_PRUNED = 1e9
"""A tie tolerance (nats) under which no candidate's partial score falls below the bound."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=100, help="candidates per PII item")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--neurons",
        type=Path,
        nargs="+",
        default=[],
        help="saved neuron sets (such as a demo's neurons/ folder), each timed ablated",
    )
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    return parser.parse_args()


def memorized_demo_run(workdir: Path) -> pipeline.Run:
    """Load the demo's records and its memorized SmolLM2 (the memorization is cached)."""
    config = pipeline.RunConfig(out=workdir, show_progress=False)
    run = pipeline.start_run(config, "demo")
    pipeline.load_demo_data(run)
    pipeline.load_run_model(run)
    pipeline.memorize_records(run)
    return run


def timed_exposure(run: pipeline.Run, config: ExposureConfig, hooks: list | None = None) -> dict:
    """Score the training records' exposure once under ``hooks`` and return the seconds, model
    passes and ranks."""
    passes = [0]

    def count(module, args) -> None:
        passes[0] += 1

    handle = run.model.register_forward_pre_hook(count)
    hook_names = [name for name, _ in hooks or []]
    try:
        # The same precision and attention path as tl_privacy.evaluation.evaluate.
        with (
            torch.no_grad(),
            weights_cast_once(run.model, run.config.precision),
            fused_attention(run.model, hook_names),
        ):
            start = time.perf_counter()
            result = exposure_scores(
                run.model,
                run.tokenizer,
                run.train,
                fwd_hooks=hooks or [],
                config=config,
                batch_size=run.config.batch_size * pipeline.EVALUATION_BATCH_FACTOR,
            )
            seconds = time.perf_counter() - start
    finally:
        handle.remove()
    return {"seconds": seconds, "passes": passes[0], "ranks": result.ranks}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = memorized_demo_run(Path("/tmp/tl-privacy-exposure-benchmark"))
    base = ExposureConfig(n_candidates=args.candidates, seed=run.config.seed)

    # Untimed: the first call draws the candidates and checks the model's KV cache.
    timed_exposure(run, base)
    # (table label, key of the JSON summary, tie tolerance, hooks)
    cases = [
        ("pruning", "pruning", 0.0, []),
        ("nothing pruned", "nothing_pruned", NOTHING_PRUNED, []),
    ]
    for index, folder in enumerate(args.neurons):
        neurons = PrivacyNeurons.load(folder, model=run.model)
        label = f"{neurons.count} neurons ablated ({neurons.method})"
        # Two sets of one method (two demo runs, say) get keys of their own.
        keys = [case[1] for case in cases]
        key = neurons.method if neurons.method not in keys else f"{neurons.method}_{index}"
        cases.append((label, key, 0.0, neurons.ablation_hooks()))

    rows, summary = [], {}
    for case, key, tolerance, hooks in cases:
        auto = timed_exposure(run, replace(base, tie_tolerance=tolerance), hooks)
        level = timed_exposure(
            run, replace(base, tie_tolerance=tolerance, trie_mode="levels"), hooks
        )
        differing = sum(a != b for a, b in zip(auto["ranks"], level["ranks"], strict=True))
        for mode, timing in (("level by level", level), ("auto (default)", auto)):
            rows.append([case, mode, f"{timing['seconds']:.1f}", timing["passes"], differing])
        summary[f"{key}_level_s"] = round(level["seconds"], 2)
        summary[f"{key}_auto_s"] = round(auto["seconds"], 2)
        summary[f"{key}_ratio"] = round(level["seconds"] / auto["seconds"], 3)

    n_items = len(auto["ranks"])
    table = markdown_table(
        ["case", "scoring", "seconds", "model passes", "ranks that differ between the modes"],
        rows,
    )
    body = (
        f"{n_items} PII items of the demo's {len(run.train)} training records, "
        f"{args.candidates} candidates each, on its memorized smollm2-135m, precision "
        f"`{run.config.precision}`, with the weights cast once and fused attention as in "
        "`evaluate`. Each time is one run of `exposure_scores`, record passes included. "
        "The modes run other batches of nodes, so bfloat16 rounding can turn a "
        "near-tie between the true PII and a candidate either way; the last column counts "
        "the items whose rank differs.\n\n"
        f"{table}\n\n"
        "Whole tries run all nodes below the surviving ones in passes of up to "
        "`max_query_tokens` (2,048) nodes. Level by level runs one pass or more per trie "
        "level, so it pays the fixed cost of a pass many times. `auto` switches to whole "
        "tries where too little is pruned for that to pay."
    )
    print(table)
    if not args.no_doc:
        write_section("exposure", "Exposure scoring: level by level against auto", body)
    print(json.dumps(summary))


if __name__ == "__main__":
    # The allocator settings of the tl-privacy command, so that the times match its runs.
    keep_freed_memory()
    main()
