"""Check the core localization target on a tiny model that memorized PII on top of pretraining.

The model meets the PII the way a pretrained language model does, in fine-tuning. A 2-layer
TL-native model is first trained on the synthetic corpus with every PII string replaced by a
placeholder, plus general text (:func:`tl_privacy.injection.train_without_pii`). Then its MLP
weights are fine-tuned on the records with their PII until greedy decoding reproduces it
(:func:`tl_privacy.memorize.memorize`, as in the SmolLM2 demo). A tiny
model trained from scratch on the records instead spreads each record over all its weights,
so that no small set of neurons stores it.

For each gate seed the script localizes privacy neurons at a budget of 5% of the MLP
neurons (``selection="budget"``, so exactly that many) and measures, against a random set of
the same size:

- exact greedy extraction of the training PII from its prefix, and its relative cut;
- teacher-forced next-token accuracy on the records' non-PII tokens, in points;
- general-text perplexity.

The target: the learned set cuts extraction by at least 80% (relative) while non-PII accuracy
drops by at most 2 points, and the random set cuts far less.

The table goes to section ``tiny-target`` of ``docs/benchmarks.md`` and to stdout; the last
line printed is one JSON object with the numbers.

Usage: python benchmarks/tiny_target.py [--seeds 0 1 2] [--steps 400]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from _markdown import markdown_table, write_section

from tl_privacy.allocator import keep_freed_memory
from tl_privacy.baselines import select
from tl_privacy.data.general import general_text
from tl_privacy.data.synthetic import PIICorpus, SyntheticCorpusConfig, generate_corpus
from tl_privacy.data.tokenization import make_batches, type_names_for
from tl_privacy.evaluation import EvaluationConfig, evaluate
from tl_privacy.hooks import attached, model_logits
from tl_privacy.injection import CleanTrainingConfig, train_without_pii
from tl_privacy.localization import LocalizationConfig, localize
from tl_privacy.memorize import MemorizeConfig, memorize
from tl_privacy.models import tiny_model, train_tokenizer

SECTION = "tiny-target"
BUDGET = 0.05
TARGET_CUT = 0.8
MAX_ACCURACY_DROP = 0.02
TOKENIZER_VOCAB = 2048

# The memorizing fine-tune uses SmolLM2's learning rate, 1e-3. At the tiny default of 3e-3
# (tl_privacy.memorize.default_lr) the fine-tune spreads each record over more neurons, and the
# gate settings below cut extraction by 32% to 40% (`--memorize-lr 0.003`, three gate seeds).
#
# Gate settings for a model this small. With the library defaults the L0 term is weak next to
# the keep term, so few gates close and the rest of the budget goes to gates that barely moved
# (`--l0-weight 0.1 --init-open-prob 0.99 --keep-weight 1 --steps 200` reports the cut).
DEFAULT_L0_WEIGHT = 1.0
DEFAULT_INIT_OPEN_PROB = 0.9
DEFAULT_KEEP_WEIGHT = 2.0


@dataclass
class Measure:
    """Leakage and utility of the model under one hook set."""

    extraction: float
    accuracy: float
    perplexity: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=(0, 1, 2), help="gate seeds (default: 0 1 2)"
    )
    parser.add_argument(
        "--steps", type=int, default=400, help="localization steps per seed (default: 400)"
    )

    parser.add_argument(
        "--l0-weight",
        type=float,
        default=DEFAULT_L0_WEIGHT,
        help=f"L0 weight of the gates (default: {DEFAULT_L0_WEIGHT:g})",
    )
    parser.add_argument(
        "--init-open-prob",
        type=float,
        default=DEFAULT_INIT_OPEN_PROB,
        help=f"initial open probability of the gates (default: {DEFAULT_INIT_OPEN_PROB:g})",
    )
    parser.add_argument(
        "--keep-weight",
        type=float,
        default=DEFAULT_KEEP_WEIGHT,
        help=f"weight of the keep term (default: {DEFAULT_KEEP_WEIGHT:g})",
    )

    parser.add_argument(
        "--base-steps",
        type=int,
        default=60,
        help="steps of training without PII before memorizing (default: 60)",
    )
    parser.add_argument(
        "--memorize-lr",
        type=float,
        default=1e-3,
        help="learning rate of the memorizing fine-tune (default: 0.001, as for SmolLM2)",
    )
    parser.add_argument(
        "--people", type=int, default=32, help="people in the synthetic corpus (default: 32)"
    )

    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument(
        "--no-write", action="store_true", help="print the table without writing the doc"
    )
    return parser.parse_args(argv)


def build_model(
    corpus: PIICorpus, folder: str, base_steps: int, lr: float
) -> tuple[Any, dict[str, Any]]:
    """Train a tiny model without the PII, then memorize the training records' PII."""
    texts = [record.text for record in [*corpus.train, *corpus.heldout]]
    tokenizer = train_tokenizer(texts + general_text().split("\n\n"), folder, TOKENIZER_VOCAB)
    model = tiny_model(tokenizer, seed=0)

    started = time.perf_counter()
    losses = train_without_pii(
        model, [*corpus.train, *corpus.heldout], config=CleanTrainingConfig(steps=base_steps)
    )
    base_seconds = time.perf_counter() - started
    outcome = memorize(model, corpus, MemorizeConfig(lr=lr, show_progress=False))
    if outcome.extraction_exact < 0.9:
        raise SystemExit(
            f"memorization reached only {outcome.extraction_exact:.2f} exact extraction in "
            f"{outcome.steps} steps; the target needs a memorized model"
        )
    info = {
        "base_steps": base_steps,
        "base_loss": losses[-1],
        "base_seconds": base_seconds,
        "memorize_steps": outcome.steps,
        "memorize_lr": lr,
        "memorize_seconds": outcome.wall_time_s,
        "heldout_extraction": outcome.heldout_extraction_exact,
    }
    return model, info


@torch.no_grad()
def non_pii_accuracy(model: Any, batches: list[dict[str, torch.Tensor]], hooks: list) -> float:
    """Teacher-forced next-token accuracy on the real, non-PII target tokens of ``batches``."""
    correct = total = 0
    with attached(model, hooks):
        for batch in batches:
            logits = model_logits(model, batch["input_ids"], batch["attention_mask"])
            hits = logits[:, :-1].argmax(-1) == batch["input_ids"][:, 1:]
            keep = batch["attention_mask"][:, 1:].bool() & ~batch["pii_mask"][:, 1:]
            correct += int(hits[keep].sum())
            total += int(keep.sum())
    return correct / total


def measure(model: Any, corpus: PIICorpus, batches: list, hooks: list) -> Measure:
    config = EvaluationConfig(n_candidates=0, extraction="greedy")
    result = evaluate(model, model.tokenizer, corpus.train, None, fwd_hooks=hooks, config=config)
    return Measure(
        extraction=result.extraction_exact,
        accuracy=non_pii_accuracy(model, batches, hooks),
        perplexity=result.perplexity_general,
    )


def gate_settings(args: argparse.Namespace) -> dict[str, float]:
    """Return the gate settings of ``args`` as ``LocalizationConfig`` fields."""
    return {
        "l0_weight": args.l0_weight,
        "init_open_prob": args.init_open_prob,
        "keep_weight": args.keep_weight,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, localize once per seed and return every number of the table."""
    torch.set_num_threads(args.threads)
    corpus = generate_corpus(SyntheticCorpusConfig(n_people=args.people, seed=0))
    with tempfile.TemporaryDirectory(prefix="tiny-target-tokenizer-") as folder:
        model, info = build_model(corpus, folder, args.base_steps, args.memorize_lr)
        type_names = type_names_for(corpus.train)
        batches = make_batches(model.tokenizer, corpus.train, 8, type_names=type_names)
        clean = measure(model, corpus, batches, [])

        rows = []
        for seed in args.seeds:
            settings = LocalizationConfig(
                budget=BUDGET,
                steps=args.steps,
                seed=seed,
                selection="budget",
                type_names=type_names,
                show_progress=False,
                **gate_settings(args),
            )
            started = time.perf_counter()
            learned = localize(model, batches, settings)
            seconds = time.perf_counter() - started
            random_set = select("random", model, batches, learned.count, seed=seed)
            rows.append(
                {
                    "seed": seed,
                    "k": learned.count,
                    "seconds": seconds,
                    "learned": measure(model, corpus, batches, learned.ablation_hooks()),
                    "random": measure(model, corpus, batches, random_set.ablation_hooks()),
                }
            )
    return {
        "model": {"n_layers": model.cfg.n_layers, "d_mlp": model.cfg.d_mlp},
        "build": info,
        "clean": clean,
        "rows": rows,
    }


def cut(clean: Measure, edited: Measure) -> float:
    """Relative cut of exact extraction, 0 (none) to 1 (all)."""
    return 1.0 - edited.extraction / clean.extraction if clean.extraction else 0.0


def meets_target(clean: Measure, learned: Measure) -> bool:
    return (
        cut(clean, learned) >= TARGET_CUT and clean.accuracy - learned.accuracy <= MAX_ACCURACY_DROP
    )


def render(args: argparse.Namespace, outcome: dict[str, Any]) -> str:
    clean, build = outcome["clean"], outcome["build"]
    model = outcome["model"]
    settings = ", ".join(f"{key} {value:g}" for key, value in gate_settings(args).items())
    intro = (
        f"Model: tiny ({model['n_layers']} layers x {model['d_mlp']} MLP neurons). It was "
        f"trained {build['base_steps']} steps on the corpus with its PII replaced by "
        f"placeholders and on the general text (loss {build['base_loss']:.3f}, "
        f"{build['base_seconds']:.0f} s). Then its MLP weights were fine-tuned on {args.people} "
        f"people's records (lr {build['memorize_lr']:g}) for {build['memorize_steps']} steps, "
        f"until greedy extraction reached {clean.extraction:.1%} (held-out "
        f"{build['heldout_extraction']:.1%}). Learned masks: budget {BUDGET:.0%} of the MLP "
        f"neurons, {args.steps} steps, {settings}. Target: extraction cut >= "
        f"{TARGET_CUT:.0%} with non-PII accuracy down <= {MAX_ACCURACY_DROP * 100:g} points, "
        "and random neurons cut far less."
    )
    header = [
        "seed",
        "neurons",
        "extraction (clean / learned / random)",
        "cut (learned / random)",
        "non-PII accuracy (clean / learned / random)",
        "accuracy drop, points (learned)",
        "general ppl (clean / learned / random)",
        "time (s)",
        "target met",
    ]
    rows = []
    for row in outcome["rows"]:
        learned, random_set = row["learned"], row["random"]
        rows.append(
            [
                row["seed"],
                row["k"],
                f"{clean.extraction:.3f} / {learned.extraction:.3f} / {random_set.extraction:.3f}",
                f"{cut(clean, learned):.1%} / {cut(clean, random_set):.1%}",
                f"{clean.accuracy:.4f} / {learned.accuracy:.4f} / {random_set.accuracy:.4f}",
                f"{(clean.accuracy - learned.accuracy) * 100:.2f}",
                f"{clean.perplexity:.1f} / {learned.perplexity:.1f} / {random_set.perplexity:.1f}",
                f"{row['seconds']:.1f}",
                "yes" if meets_target(clean, learned) else "no",
            ]
        )
    return intro + "\n\n" + markdown_table(header, rows)


def summary(outcome: dict[str, Any]) -> dict[str, Any]:
    clean = outcome["clean"]
    return {
        "clean_extraction": clean.extraction,
        "clean_accuracy": clean.accuracy,
        "seeds": [
            {
                "seed": row["seed"],
                "k": row["k"],
                "learned_cut": cut(clean, row["learned"]),
                "random_cut": cut(clean, row["random"]),
                "accuracy_drop": clean.accuracy - row["learned"].accuracy,
                "target_met": meets_target(clean, row["learned"]),
            }
            for row in outcome["rows"]
        ],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    outcome = run(args)
    body = render(args, outcome)
    print(body)
    if not args.no_write:
        title = "Core target: 5% of the neurons on a tiny model memorized after pretraining"
        path = write_section(SECTION, title, body)
        print(f"wrote section {SECTION!r} of {path}")
    print(json.dumps(summary(outcome)))


if __name__ == "__main__":
    # The allocator settings of the tl-privacy command, so that the times match its runs.
    keep_freed_memory()
    main()
