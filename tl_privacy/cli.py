"""The ``tl-privacy`` command: demo, localize, evaluate and report.

Invalid input (a missing file, a budget outside (0, 1), an unknown model) prints one
``tl-privacy <command>: error: ...`` line and exits with code 2 before anything is written.
Input errors found while running, such as an invalid record, also exit with code 2. They
leave no output folder, because each run writes into a staging folder that is renamed at
the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from tl_privacy.allocator import keep_freed_memory
from tl_privacy.pipeline import (
    BASELINE_METHODS,
    DEFAULT_CANDIDATES,
    DEFAULT_STEPS,
    FALLBACK_CANDIDATES,
    SMOLLM2,
    TINY,
    InputError,
    RunConfig,
    headline_table,
    rerender_report,
    run_demo,
    run_evaluate,
    run_localize,
)
from tl_privacy.redact import RedactingFilter, Redactor

LOGGER_NAME = "tl_privacy"
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130
KEEP_FREED_MEMORY_ENV = "TL_PRIVACY_KEEP_FREED_MEMORY"


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INPUT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _MessageFormatter(logging.Formatter):
    """INFO lines as plain messages; warnings and errors prefixed with their level."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def fraction(value: str) -> float:
    """Parse a budget: a fraction of all MLP neurons strictly between 0 and 1."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid budget {value!r}: give a fraction such as 0.01 (1% of MLP neurons)"
        ) from None
    if not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(
            f"invalid budget {value}: it must be a fraction of all MLP neurons strictly between "
            "0 and 1, e.g. 0.01 for 1%"
        )
    return number


def positive_int(value: str) -> int:
    """Parse an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def non_negative_int(value: str) -> int:
    """Parse an integer >= 0."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def build_parser() -> ArgumentParser:
    """Return the argument parser of ``tl-privacy`` with its four subcommands."""
    parser = ArgumentParser(
        prog="tl-privacy",
        description=(
            "Find the MLP neurons of a language model that hold memorized personal data "
            "(PII) and switch them off."
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="run the whole pipeline on a synthetic PII corpus",
        description=(
            "Generate a synthetic corpus (every person has a name, e-mail address, phone number "
            "and street address), fine-tune the model until it memorizes it, localize the "
            "privacy neurons, ablate them, evaluate against baselines of the same size, measure "
            "specificity per PII type, and write results.json, report.html and neurons/."
        ),
    )
    demo.add_argument(
        "--model",
        choices=(SMOLLM2, TINY),
        default=SMOLLM2,
        help=f"model to run on: {SMOLLM2} (embedded SmolLM2-135M) or {TINY} (a 2-layer model "
        f"for tests, built with a tokenizer trained on the corpus). Default: {SMOLLM2}.",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("tl-privacy-demo"),
        help="output folder for results.json, report.html and neurons/ (default: "
        "./tl-privacy-demo); an earlier output folder there is replaced",
    )
    demo.add_argument(
        "--people",
        type=positive_int,
        default=32,
        help="number of people in the training part of the synthetic corpus (default: 32)",
    )
    demo.add_argument(
        "--no-specificity",
        action="store_true",
        help="skip the per-type localization, Jaccard overlap and cross-ablation stage",
    )
    _add_candidates_argument(demo)
    _add_localization_arguments(demo)
    _add_common(demo, "demo")

    localize = commands.add_parser(
        "localize",
        help="localize the privacy neurons of your own labelled records",
        description=(
            "Localize the MLP neurons that hold the PII of your records. Writes the neuron set "
            "to OUT/neurons (load it with PrivacyNeurons.load) and a summary to "
            "OUT/results.json. A model folder is used as it is; with --model tiny a small "
            "test model first memorizes the records."
        ),
    )
    _add_model_argument(localize)
    _add_data_argument(localize)
    _add_out_argument(localize)
    _add_localization_arguments(localize)
    _add_common(localize, "localize")

    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a saved neuron set on your records",
        description=(
            "Evaluate the model with and without the neurons of --neurons ablated: "
            "extraction, exposure, MRR and perplexity. Writes OUT/results.json and "
            "OUT/report.html."
        ),
    )
    _add_model_argument(evaluate)
    _add_data_argument(evaluate)
    evaluate.add_argument(
        "--neurons",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder of the neuron set, as written by `tl-privacy localize` (OUT/neurons)",
    )
    evaluate.add_argument(
        "--heldout",
        type=Path,
        metavar="FILE",
        help="records the model never trained on, for held-out perplexity and extraction "
        "(same formats as --data); records whose meta.split is 'heldout' count too",
    )
    _add_out_argument(evaluate)
    _add_candidates_argument(evaluate)
    _add_common(evaluate, "evaluate")

    report = commands.add_parser(
        "report",
        help="render report.html again from results.json",
        description="Render RESULTS_DIR/report.html from RESULTS_DIR/results.json.",
    )
    report.add_argument(
        "results_dir", type=Path, metavar="RESULTS_DIR", help="output folder of an earlier run"
    )
    report.add_argument("--quiet", "-q", action="store_true", help="log warnings and errors only")
    return parser


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="NAME_OR_PATH",
        help=f"{SMOLLM2}, a local Hugging Face model folder, or {TINY} (a 2-layer test model "
        "that first memorizes the records)",
    )


def _add_data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="FILE",
        help="labelled records: JSONL, JSON, CSV or Parquet file, or a saved `datasets` "
        "folder; each record has 'text' and 'spans' (start, end, type in code points)",
    )


def _add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="output folder; it must be new, empty, or an earlier tl-privacy output folder",
    )


def _add_candidates_argument(parser: argparse.ArgumentParser) -> None:
    defaults = ", ".join(f"{model}: {n}" for model, n in DEFAULT_CANDIDATES.items())
    parser.add_argument(
        "--candidates",
        type=non_negative_int,
        metavar="N",
        help="same-format candidate strings per PII item for exposure and MRR; 0 skips both "
        f"(default: {FALLBACK_CANDIDATES}; {defaults})",
    )
    parser.add_argument(
        "--heldout-exposure",
        action="store_true",
        help="also measure the clean model's exposure of the held-out PII, which it never saw: "
        "the exposure that the context alone gives away, below which ablation cannot go "
        "(costs about one more exposure pass)",
    )


def _add_localization_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--budget",
        type=fraction,
        default=0.01,
        metavar="FRACTION",
        help="upper bound on the privacy neurons as a fraction of all MLP neurons, strictly "
        "between 0 and 1; at least one neuron is kept (default: 0.01 = 1%%)",
    )
    steps = ", ".join(f"{model}: {n}" for model, n in DEFAULT_STEPS.items())
    parser.add_argument(
        "--steps",
        type=positive_int,
        metavar="N",
        help=f"localization optimizer steps, one batch each (default per model: {steps})",
    )
    parser.add_argument(
        "--no-keep-text",
        action="store_true",
        help="localize with the records alone, without the shipped everyday essays that "
        "keep the model's predictions on ordinary English (see docs/concepts.md)",
    )


# The random draws that --seed seeds, per command.
_SEEDED = {
    "demo": "the synthetic corpus, the tiny model, the mask noise, the random baseline and the "
    "exposure candidates",
    "localize": "the tiny model and the mask noise",
    "evaluate": "the tiny model and the exposure candidates",
}


def _add_common(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help=f"seed of {_SEEDED[command]} (default: 0)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        metavar="N",
        help="records per batch in localization and evaluation (default: 8)",
    )
    parser.add_argument(
        "--device", help="torch device, e.g. cpu or cuda (default: the model loader's choice)"
    )
    parser.add_argument(
        "--show-pii",
        action="store_true",
        help="show PII values in logs, results.json and report.html; by default the labelled "
        "PII, and any e-mail address or phone number, is replaced by [EMAIL], [PHONE], [NAME] "
        "or [ADDRESS] (unlabelled names and addresses are not recognised)",
    )
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bars; log warnings and errors only"
    )


@contextmanager
def logging_to_stderr(redactor: Redactor, quiet: bool) -> Iterator[logging.Handler]:
    """Send the ``tl_privacy`` logger to stderr, redacted by ``redactor``, without timestamps.

    The logger's level, propagation and handlers are restored afterwards, so calling
    ``main`` from Python (tests, notebooks) leaves the caller's logging as it was.
    """
    logger = logging.getLogger(LOGGER_NAME)
    saved = (logger.level, logger.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MessageFormatter("%(message)s"))
    handler.addFilter(RedactingFilter(redactor))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    # Without this, a root handler that the caller configured would print every line again.
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Build the run settings of a demo, localize or evaluate command."""
    config = RunConfig(
        out=args.out,
        model=args.model,
        budget=getattr(args, "budget", RunConfig.budget),
        steps=getattr(args, "steps", None),
        keep_text=not getattr(args, "no_keep_text", False),
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        show_pii=args.show_pii,
        # Progress bars redraw with carriage returns, which only a terminal shows well.
        show_progress=not args.quiet and sys.stderr.isatty(),
        baselines=BASELINE_METHODS,
    )
    if args.command in ("demo", "evaluate"):
        config.n_candidates = args.candidates
        config.heldout_exposure = args.heldout_exposure
    if args.command == "demo":
        config.n_people = args.people
        config.specificity = not args.no_specificity
    else:
        config.data = args.data.expanduser()
    if args.command == "evaluate":
        config.neurons = args.neurons.expanduser()
        config.heldout = args.heldout.expanduser() if args.heldout else None
    return config


def run_command(args: argparse.Namespace, redactor: Redactor) -> None:
    """Run the command of ``args``; print the demo's headline table to stdout."""
    if args.command == "report":
        path = rerender_report(args.results_dir)
        logging.getLogger(LOGGER_NAME).info("wrote %s", path)
        return

    config = config_from_args(args)
    runners = {"demo": run_demo, "localize": run_localize, "evaluate": run_evaluate}
    results = runners[args.command](config, redactor)
    if args.command in ("demo", "evaluate"):
        print(headline_table(results))
    print(f"results: {config.out / 'results.json'}\nreport:  {config.out / 'report.html'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tl-privacy`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    redactor = Redactor(enabled=not getattr(args, "show_pii", False))
    try:
        with logging_to_stderr(redactor, args.quiet), _terminate_as_exit():
            run_command(args, redactor)
    except KeyboardInterrupt:
        print(f"tl-privacy {args.command}: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _input_errors() as error:
        text = str(error).strip()
        message = redactor.redact(text.splitlines()[0] if text else repr(error))
        print(f"tl-privacy {args.command}: error: {message}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    return 0


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` for the block, so the staging folder is removed.

    Python's default SIGTERM action ends the process without running ``finally`` blocks.
    Signal handlers can only be set from the main thread; elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_signal(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input rather than by a bug; they exit with code 2."""
    from tl_privacy.data.records import InvalidRecordError
    from tl_privacy.hooks import UnsupportedModelError
    from tl_privacy.models import ModelNotFoundError
    from tl_privacy.neurons import IncompatibleNeuronsError

    return (
        InputError,
        InvalidRecordError,
        UnsupportedModelError,
        ModelNotFoundError,
        IncompatibleNeuronsError,
    )


def console_main() -> NoReturn:
    """Entry point of the ``tl-privacy`` console script: tune the allocator, run, exit.

    The allocator settings (:func:`tl_privacy.allocator.keep_freed_memory`) are process-wide,
    so they are applied here, in a process of our own, and not by :func:`main`, which tests
    and notebooks call in theirs. ``TL_PRIVACY_KEEP_FREED_MEMORY=0`` in the environment
    leaves the allocator as it is.
    """
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") != "0":
        keep_freed_memory()
    sys.exit(main())


if __name__ == "__main__":
    console_main()
