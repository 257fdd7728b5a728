"""Measure what the gate hooks add to a forward and a forward-backward pass.

Four cases on one batch, timed in interleaved rounds so that drift in machine
load hits every case alike (every other round in reverse order):

  a. forward, no hooks;
  b. forward, a deterministic (eval) mask on every layer;
  c. forward and backward, a learnable mask on layer 0 only (the backward pass
     still runs through the whole model, down to layer 0);
  d. forward and backward, a learnable mask on every layer.

The last line printed is one JSON object with the medians (seconds) and
``fwd_ratio = b / a`` and ``fwd_bwd_ratio = d / c``. The table also goes into the
``overhead`` section of docs/benchmarks.md (``--no-doc`` leaves the file alone).

Usage: python benchmarks/overhead.py [--model smollm2-135m] [--batch 8] [--seq 64] [--rounds 21]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _markdown import markdown_table, write_section

from tl_privacy import HardConcreteMask
from tl_privacy.allocator import keep_freed_memory
from tl_privacy.hooks import attached, mlp_post_name
from tl_privacy.localization import frozen
from tl_privacy.models import load_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model name or folder")
    parser.add_argument("--batch", type=int, default=8, help="rows per batch")
    parser.add_argument("--seq", type=int, default=64, help="tokens per row")
    # Single passes on a shared 2-core machine vary by several percent (page faults, other
    # load), which moves the median of a few rounds by as much as the overhead measured, so
    # the default takes 21 rounds.
    parser.add_argument("--rounds", type=int, default=21, help="interleaved timing rounds (>= 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--no-doc", action="store_true", help="do not write the table to docs/benchmarks.md"
    )
    return parser.parse_args()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.rounds < 5:
        raise SystemExit(f"--rounds must be at least 5, got {args.rounds}")
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    vocab = model.cfg.d_vocab
    tokens = torch.randint(
        0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )

    eval_mask = HardConcreteMask.for_model(model).eval()
    train_mask = HardConcreteMask.for_model(model, seed=0).train()
    layer0_hooks = [(mlp_post_name(0), train_mask.fwd_hooks()[0][1])]

    def forward_plain() -> None:
        with torch.no_grad():
            model(tokens, return_type="logits")

    def forward_masked() -> None:
        with torch.no_grad(), attached(model, eval_mask.fwd_hooks()):
            model(tokens, return_type="logits")

    def train_step(hooks) -> None:
        train_mask.log_alpha.grad = None
        with attached(model, hooks):
            logits = model(tokens, return_type="logits")
        # A cheap scalar loss keeps the timing on the model, not on the loss.
        logits[:, -1].logsumexp(-1).mean().backward()

    cases = {
        "fwd_plain": forward_plain,
        "fwd_masked_all": forward_masked,
        "fwd_bwd_mask_layer0": lambda: train_step(layer0_hooks),
        "fwd_bwd_mask_all": lambda: train_step(train_mask.fwd_hooks()),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    with frozen(model):
        for fn in cases.values():  # warm-up
            fn()
        for round_index in range(args.rounds):
            # Every other round runs the cases in reverse order, so that no case always
            # follows the same one.
            order = list(cases.items())
            if round_index % 2:
                order.reverse()
            for name, fn in order:
                times[name].append(timed(fn))

    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:>22}: median {value * 1000:8.1f} ms over {args.rounds} rounds")
    summary = {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        **{f"{name}_s": round(value, 5) for name, value in medians.items()},
        "fwd_ratio": round(medians["fwd_masked_all"] / medians["fwd_plain"], 4),
        "fwd_bwd_ratio": round(medians["fwd_bwd_mask_all"] / medians["fwd_bwd_mask_layer0"], 4),
    }
    if not args.no_doc:
        write_doc(args, medians, summary)
    print(json.dumps(summary))


def write_doc(args: argparse.Namespace, medians: dict[str, float], summary: dict) -> None:
    rows = [
        ["a. forward, no hooks", medians["fwd_plain"] * 1000, None],
        [
            "b. forward, eval mask on every layer",
            medians["fwd_masked_all"] * 1000,
            f"{summary['fwd_ratio']:.4f}",
        ],
        [
            "c. forward + backward, learnable mask on layer 0",
            medians["fwd_bwd_mask_layer0"] * 1000,
            None,
        ],
        [
            "d. forward + backward, learnable mask on every layer",
            medians["fwd_bwd_mask_all"] * 1000,
            f"{summary['fwd_bwd_ratio']:.4f}",
        ],
    ]
    body = (
        f"{args.model}, batch {args.batch} x {args.seq} tokens, float32, median of "
        f"{args.rounds} interleaved rounds, every other one in reverse order. The ratio is "
        "b / a for the forward pass and d / c for the training step.\n\n"
        + markdown_table(["case", "median (ms)", "ratio"], rows)
    )
    write_section("overhead", "Hook overhead", body)


if __name__ == "__main__":
    # The allocator settings of the tl-privacy command, so that the times match its runs.
    keep_freed_memory()
    main()
