"""Check that mask training keeps no activations from one step to the next.

Each localization step runs a forward and a backward pass of the gated model. Once the
step returns, nothing of that pass should stay alive: not the activations, not the
vocabulary-sized logits, not the autograd graph. If something did, the resident memory of a
run would grow with every step. The check, on the demo's batch shapes (8 rows of 96 to 110
tokens, 8 PII tokens per row, bfloat16 autocast where the CPU runs it natively):

1. Warm-up: one step per batch, so that the caches that are meant to last (the unmasked
   model's reference predictions, autocast's bfloat16 weights, Adam's state) exist.
2. ``base``: the resident memory after the warm-up.
3. ``single``: the peak resident memory of one step of each batch alone, above ``base``.
   Only the largest counts: it is what one forward and backward pass needs.
4. ``run``: the peak resident memory of ``--steps`` steps in a row, above ``base``, and
   ``retained``: the resident memory after them, above ``base``.

The ratio ``run / single`` is the result: 1.0 means a run of steps needs no more memory
than its largest step, and retained activations would make it grow with ``--steps``.

This process sets glibc's ``malloc`` to hand every block of 128 KiB or more back to the
kernel when it is freed, so that the resident memory follows the live tensors. The
``tl-privacy`` command does the opposite for speed
(:func:`tl_privacy.allocator.keep_freed_memory`). The peaks come from the kernel's
high-water mark (``VmHWM`` in ``/proc/self/status``), which this process resets before each
measurement by writing 5 to ``/proc/self/clear_refs``. This script therefore runs on Linux
with glibc only.

The table goes to section ``memory`` of ``docs/benchmarks.md`` (``--no-doc`` leaves the
file alone); the last line printed is one JSON object with the numbers.

Usage: python benchmarks/memory.py [--model smollm2-135m] [--steps 20] [--precision auto]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import re
import sys
from pathlib import Path
from typing import Any

import torch
from _markdown import markdown_table, write_section
from jaxtyping import Bool, Int

from tl_privacy.localization import LocalizationConfig, Localizer
from tl_privacy.models import load_model

# Batch shapes of the demo's localization batches on SmolLM2.
BATCH_ROWS = 8
BATCH_LENGTHS = (96, 100, 105, 110)
PII_TOKENS = 8
SEED = 0

# Parameter numbers of mallopt(3), from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_RETURN_ABOVE_BYTES = 128 * 1024

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def return_freed_memory() -> None:
    """Make glibc's ``malloc`` give blocks of 128 KiB or more back to the kernel on ``free``.

    Raises:
        SystemExit: on a platform without glibc, where the measurement would mean nothing.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        raise SystemExit("benchmarks/memory.py needs Linux with glibc (it reads /proc/self).")
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # A fixed threshold also turns off glibc's raising of it after large frees.
    if not (
        mallopt(_M_MMAP_THRESHOLD, _RETURN_ABOVE_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, _RETURN_ABOVE_BYTES)
    ):
        raise SystemExit("mallopt failed to set M_MMAP_THRESHOLD or M_TRIM_THRESHOLD.")


def status_mib(field: str) -> float:
    """Return ``field`` (``VmRSS`` or ``VmHWM``) of ``/proc/self/status`` in MiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(encoding="ascii"), re.M)
    if match is None:
        raise SystemExit(f"/proc/self/status has no {field} line.")
    return int(match.group(1)) / 1024


def reset_peak() -> None:
    """Reset this process' resident-memory high-water mark to its current resident memory."""
    _CLEAR_REFS.write_text("5", encoding="ascii")
    if status_mib("VmHWM") > status_mib("VmRSS") + 1:
        raise SystemExit("writing 5 to /proc/self/clear_refs did not reset VmHWM.")


def synthetic_batches(
    d_vocab: int, lengths: tuple[int, ...] = BATCH_LENGTHS
) -> list[dict[str, torch.Tensor]]:
    """Return one seeded batch of random token ids per length in ``lengths``.

    Each row has ``PII_TOKENS`` PII positions in its middle, and every other position is kept.

    Shapes: ``input_ids``, ``attention_mask`` and ``pii_mask`` are ``[8, length]``.
    """
    generator = torch.Generator().manual_seed(SEED)
    batches = []
    for length in lengths:
        input_ids: Int[torch.Tensor, "batch pos"] = torch.randint(
            0, d_vocab, (BATCH_ROWS, length), generator=generator
        )
        pii_mask: Bool[torch.Tensor, "batch pos"] = torch.zeros_like(input_ids, dtype=torch.bool)
        start = length // 2
        pii_mask[:, start : start + PII_TOKENS] = True
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "pii_mask": pii_mask,
            }
        )
    return batches


def measure(
    model: Any, precision: str, steps: int, lengths: tuple[int, ...] = BATCH_LENGTHS
) -> dict[str, Any]:
    """Run the warm-up, the single steps and the run of ``steps`` steps on batches of
    ``lengths`` tokens; return MiB values."""
    config = LocalizationConfig(precision=precision, seed=SEED, show_progress=False)
    localizer = Localizer(model, config)
    batches = localizer.prepare(synthetic_batches(model.cfg.d_vocab, lengths))

    with localizer:
        for key, batch in enumerate(batches):
            localizer.step(batch, key=key)
        base = status_mib("VmRSS")

        single = []
        for key, batch in enumerate(batches):
            reset_peak()
            localizer.step(batch, key=key)
            single.append(status_mib("VmHWM") - base)

        reset_peak()
        for step in range(steps):
            key = step % len(batches)
            localizer.step(batches[key], key=key)
        run = status_mib("VmHWM") - base
        retained = status_mib("VmRSS") - base

    return {
        "base_rss_mib": round(base, 1),
        "single_step_peak_mib": [round(value, 1) for value in single],
        "run_peak_mib": round(run, 1),
        "retained_mib": round(retained, 1),
        # None when no step raised the resident memory measurably (a tiny model whose pages
        # are already resident), where a ratio would mean nothing.
        "ratio": round(run / max(single), 3) if max(single) > 0 else None,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model name or folder")
    parser.add_argument("--steps", type=int, default=20, help="steps in the measured run (>= 4)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bfloat16", "float32"),
        help="autocast precision of the steps, as in LocalizationConfig",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--no-doc", action="store_true", help="do not write the table to docs/benchmarks.md"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.steps < len(BATCH_LENGTHS):
        raise SystemExit(f"--steps must be at least {len(BATCH_LENGTHS)}, got {args.steps}")
    return_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    values = measure(model, args.precision, args.steps)
    result = {"model": args.model, "precision": args.precision, "steps": args.steps, **values}

    if not args.no_doc:
        rows = [
            [
                args.model,
                args.precision,
                values["base_rss_mib"],
                max(values["single_step_peak_mib"]),
                args.steps,
                values["run_peak_mib"],
                values["retained_mib"],
                values["ratio"],
            ]
        ]
        header = [
            "model",
            "precision",
            "base RSS (MiB)",
            "largest single step: peak above base (MiB)",
            "steps in the run",
            "run: peak above base (MiB)",
            "after the run: RSS above base (MiB)",
            "run / single step",
        ]
        lengths = ", ".join(str(length) for length in BATCH_LENGTHS)
        body = (
            markdown_table(header, rows)
            + "\n\n"
            + f"Batches: {BATCH_ROWS} rows of random token ids, {len(BATCH_LENGTHS)} batches of "
            + f"{lengths} tokens, {PII_TOKENS} PII tokens per row, all other positions kept "
            + "(KL term). Base is the resident memory after one warm-up step per batch, with "
            + "the reference predictions cached. Single-step peaks per batch: "
            + ", ".join(f"{value:.0f}" for value in values["single_step_peak_mib"])
            + " MiB. The process returns freed blocks of 128 KiB or more to the kernel, so "
            + "that its resident memory follows the live tensors; peaks are `VmHWM` after a "
            + "reset through `/proc/self/clear_refs`."
        )
        write_section("memory", "Memory of mask training across steps", body)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
