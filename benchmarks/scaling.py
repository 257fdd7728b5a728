"""Time one mask-training step against model size, in float32 and under bfloat16 autocast.

One step is :meth:`tl_privacy.localization.Localizer.step`: a forward and a backward pass
of the gated model on one batch and an Adam step on the gates. The batch is 8 rows of 64
random token ids whose positions 32 to 39 are labelled PII (a PII span of the length the
synthetic records have). One warm-up step precedes the timed steps, and it also computes
and caches the unmasked model's reference predictions for the KL term. The table gives the
median of the timed steps.

Models: SmolLM2-135M (``smollm2-135m``) and TL-native tiny models of 2, 4 and 8 layers
(``tiny-2``, ``tiny-4``, ``tiny-8``). The tiny models share one width (d_model 256, d_mlp
1024, 4 heads) and a tokenizer trained on the synthetic corpus. By default each (model,
precision) pair runs in its own process, so its peak resident memory is its own.

The table goes to section ``scaling`` of ``docs/benchmarks.md`` and to stdout; the last
line printed is one JSON object with its numbers. ``--gpu-notes`` writes section ``gpu``
(how to run tl-privacy on one or several GPUs) and times nothing.

Usage: python benchmarks/scaling.py [--models tiny-2,tiny-4,tiny-8,smollm2-135m] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from _markdown import DOC, markdown_table, write_section
from jaxtyping import Bool, Int

from tl_privacy.allocator import keep_freed_memory
from tl_privacy.localization import LocalizationConfig, Localizer

logger = logging.getLogger("tl_privacy")

SMOLLM2 = "smollm2-135m"
DEFAULT_MODELS = ("tiny-2", "tiny-4", "tiny-8", SMOLLM2)
PRECISIONS = ("float32", "bfloat16")
TINY_WIDTH = {"d_model": 256, "d_mlp": 1024, "n_heads": 4}
BATCH_ROWS = 8
BATCH_TOKENS = 64
PII_START, PII_END = 32, 40
WARMUP_STEPS = 1
MIN_TIMED_STEPS = 5
SEED = 0


@dataclass
class Measurement:
    """Step times of one model at one precision.

    ``peak_rss_mib`` is the peak resident memory of the process that measured it, in MiB:
    of a process of its own when ``isolated``, else of the whole benchmark process so far.
    """

    model: str
    n_layers: int
    d_model: int
    d_mlp: int
    d_vocab: int
    parameters: int
    n_neurons: int
    precision: str
    step_seconds: list[float]
    peak_rss_mib: float
    isolated: bool

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.step_seconds)

    def to_dict(self) -> dict[str, Any]:
        """Return the measurement as JSON values, with the median and steps per second."""
        values = asdict(self)
        values["median_step_s"] = self.median_seconds
        values["steps_per_s"] = 1.0 / self.median_seconds
        return values


# ---- models and batch ----


def tiny_layers(name: str) -> int | None:
    """Return N for ``"tiny-N"``, None for SmolLM2; raise ValueError for any other name."""
    if name == SMOLLM2:
        return None
    match = re.fullmatch(r"tiny-([1-9][0-9]*)", name)
    if match is None:
        raise ValueError(f"unknown model {name!r}; use tiny-N (N layers) or {SMOLLM2}")
    return int(match.group(1))


def corpus_tokenizer(folder: Path) -> Any:
    """Train the tiny models' byte-level BPE tokenizer on the synthetic corpus' text."""
    from tl_privacy.data.synthetic import SyntheticCorpusConfig, generate_corpus
    from tl_privacy.models import train_tokenizer

    corpus = generate_corpus(SyntheticCorpusConfig(seed=SEED))
    texts = [record.text for record in [*corpus.train, *corpus.heldout]]
    return train_tokenizer(texts, folder)


def build_model(name: str, workdir: Path) -> Any:
    """Build ``tiny-N`` (tokenizer trained into ``workdir``) or load SmolLM2-135M."""
    from tl_privacy.models import load_model, tiny_model

    n_layers = tiny_layers(name)
    if n_layers is None:
        return load_model(SMOLLM2)
    tokenizer = corpus_tokenizer(workdir / "tokenizer")
    return tiny_model(tokenizer, n_layers=n_layers, seed=SEED, **TINY_WIDTH)


def synthetic_batch(d_vocab: int) -> dict[str, torch.Tensor]:
    """Return one seeded batch of random token ids with positions 32 to 39 labelled PII.

    Shapes: ``input_ids``, ``attention_mask`` and ``pii_mask`` are ``[8, 64]``.
    """
    generator = torch.Generator().manual_seed(SEED)
    input_ids: Int[torch.Tensor, "batch pos"] = torch.randint(
        0, d_vocab, (BATCH_ROWS, BATCH_TOKENS), generator=generator
    )
    pii_mask: Bool[torch.Tensor, "batch pos"] = torch.zeros_like(input_ids, dtype=torch.bool)
    pii_mask[:, PII_START:PII_END] = True
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pii_mask": pii_mask,
    }


# ---- timing ----


def time_steps(model: Any, precision: str, timed_steps: int) -> list[float]:
    """Return the wall time in seconds of ``timed_steps`` localizer steps after the warm-up."""
    config = LocalizationConfig(precision=precision, seed=SEED, show_progress=False)
    localizer = Localizer(model, config)
    batch = localizer.prepare([synthetic_batch(model.cfg.d_vocab)])[0]
    synchronize = torch.cuda.synchronize if localizer.device.type == "cuda" else lambda: None

    seconds = []
    with localizer:
        for _ in range(WARMUP_STEPS):
            localizer.step(batch, key=0)
        for _ in range(timed_steps):
            synchronize()
            start = time.perf_counter()
            localizer.step(batch, key=0)
            synchronize()
            seconds.append(time.perf_counter() - start)
    return seconds


def peak_rss_mib() -> float:
    """Return this process' peak resident memory in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, precision: str, timed_steps: int, *, isolated: bool = False) -> Measurement:
    """Build ``name`` in this process and time its steps at ``precision``."""
    from tl_privacy.hooks import check_model

    with tempfile.TemporaryDirectory(prefix="tl-privacy-scaling-") as workdir:
        model = build_model(name, Path(workdir))
        n_layers, d_mlp = check_model(model)
        seconds = time_steps(model, precision, timed_steps)
    return Measurement(
        model=name,
        n_layers=n_layers,
        d_model=model.cfg.d_model,
        d_mlp=d_mlp,
        d_vocab=model.cfg.d_vocab,
        parameters=sum(p.numel() for p in model.parameters()),
        n_neurons=n_layers * d_mlp,
        precision=precision,
        step_seconds=seconds,
        peak_rss_mib=round(peak_rss_mib(), 1),
        isolated=isolated,
    )


def measure_in_subprocess(
    name: str, precision: str, timed_steps: int, threads: int | None
) -> Measurement:
    """Run :func:`measure` in a new Python process and read its JSON line back."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--precisions",
        precision,
        "--steps",
        str(timed_steps),
    ]
    if threads:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"measuring {name} at {precision} failed with exit code {done.returncode}:\n"
            f"{done.stderr[-3000:]}"
        )
    values = json.loads(done.stdout.strip().splitlines()[-1])
    values.pop("median_step_s")
    values.pop("steps_per_s")
    return Measurement(**values)


def run_scaling(
    models: list[str],
    precisions: list[str],
    timed_steps: int,
    *,
    isolate: bool = True,
    threads: int | None = None,
) -> list[Measurement]:
    """Measure every model at every precision, each in its own process when ``isolate``."""
    measurements = []
    for name in models:
        for precision in precisions:
            if isolate:
                measurement = measure_in_subprocess(name, precision, timed_steps, threads)
            else:
                measurement = measure(name, precision, timed_steps)
            logger.info(
                "scaling: %s %s: median step %.3f s, peak memory %.0f MiB",
                name,
                precision,
                measurement.median_seconds,
                measurement.peak_rss_mib,
            )
            measurements.append(measurement)
    return measurements


# ---- output ----

HEADER = [
    "model",
    "layers",
    "d_model",
    "d_mlp",
    "vocabulary",
    "parameters",
    "MLP neurons",
    "precision",
    "median step (s)",
    "steps/s",
    "peak RSS (MiB)",
]


def table_rows(measurements: list[Measurement]) -> list[list[object]]:
    """Return one table row per (model, precision)."""
    return [
        [
            m.model,
            m.n_layers,
            m.d_model,
            m.d_mlp,
            m.d_vocab,
            f"{m.parameters / 1e6:.2f}M",
            m.n_neurons,
            m.precision,
            m.median_seconds,
            1.0 / m.median_seconds,
            m.peak_rss_mib,
        ]
        for m in measurements
    ]


def native_bfloat16() -> bool:
    """Return whether this CPU computes bfloat16 matrix products natively (AVX512-BF16/AMX)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers, absent from some torch builds
        return False


def notes(measurements: list[Measurement], timed_steps: int) -> str:
    """Return the notes under the table: workload, width, precision and memory."""
    isolated = all(m.isolated for m in measurements)
    memory = (
        "Peak RSS is the peak resident memory of a process that built one model and timed one "
        "precision, so it includes Python, torch and the model's construction."
        if isolated
        else "Peak RSS is the benchmark process' peak so far (`--no-isolate`), so a row "
        "includes the memory of every row before it."
    )
    bfloat16 = "natively" if native_bfloat16() else "without native support (emulated, slower)"
    return "\n\n".join(
        [
            f"One step is `Localizer.step`: forward and backward pass of the gated model on "
            f"{BATCH_ROWS} x {BATCH_TOKENS} random tokens ({PII_END - PII_START} PII positions "
            f"per row) and an Adam step on the gates; median of {timed_steps} timed steps after "
            f"{WARMUP_STEPS} warm-up step, which also caches the KL reference predictions.",
            f"tiny-N: TL-native, N layers of {TINY_WIDTH['n_heads']} heads, with a byte-level "
            "BPE tokenizer trained on the synthetic corpus. smollm2-135m: SmolLM2-135M-Instruct "
            "with float32 weights.",
            f"bfloat16 is autocast of the forward pass (gates and optimizer stay float32); this "
            f"CPU runs it {bfloat16}.",
            memory,
        ]
    )


def to_json(measurements: list[Measurement], timed_steps: int) -> dict[str, Any]:
    """Return the table's numbers as one JSON-ready object."""
    return {
        "benchmark": "scaling",
        "batch_rows": BATCH_ROWS,
        "batch_tokens": BATCH_TOKENS,
        "timed_steps": timed_steps,
        "warmup_steps": WARMUP_STEPS,
        "threads": torch.get_num_threads(),
        "rows": [m.to_dict() for m in measurements],
    }


def report(measurements: list[Measurement], timed_steps: int, doc: Path = DOC) -> dict[str, Any]:
    """Write section ``scaling`` of ``doc``, print the table, and return the JSON object."""
    table = markdown_table(HEADER, table_rows(measurements))
    body = f"{table}\n\n{notes(measurements, timed_steps)}\n"
    write_section("scaling", "Mask-training step time against model size", body, doc=doc)
    print(table)
    result = to_json(measurements, timed_steps)
    print(json.dumps(result))
    return result


# ---- GPU notes ----

GPU_NOTES = """\
Nothing on this page was run on a GPU: the machines these benchmarks ran on have none, so
every statement below comes from reading the code (tl-privacy at this commit,
TransformerLens 4.3.0, transformers 5.25) and is untested.

**One GPU.** These settings exist:

- `tl_privacy.models.load_model(name, device="cuda")` loads SmolLM2-135M, a local Hugging
  Face folder or a hub name onto one device. `tiny_model(...)` has no device argument:
  call `.to("cuda")` on the model it returns.
- The CLI's `--device cuda` (commands `demo`, `localize` and `evaluate`) sets
  `RunConfig(device=...)`, which the pipeline passes to `load_model` or uses to move the
  tiny model.
- `LocalizationConfig(device=...)` and `BaselineConfig(device=...)` set the device of the
  gates and batches; None (the default) uses the device of the model's first parameter.
  `EvaluationConfig` has no device: evaluation moves its inputs to the model's device.
- `precision="auto"` resolves to bfloat16 on a CUDA device when
  `torch.cuda.is_bf16_supported()` is true (`tl_privacy.precision.resolve_precision`).
- The benchmark scripts have no device option and run on the CPU.

**Several GPUs.** `load_model` has no `device_map`. TransformerLens 4.3.0 offers two ways
(`transformer_lens/model_bridge/sources/transformers/source.py`):

1. Let the bridge load the model:
   `TransformerBridge.boot_transformers(folder, device_map="auto", dtype=torch.bfloat16)`,
   or `n_devices=N`, which it turns into accelerate's `"balanced"` map with a memory cap
   per GPU. `device` and `device_map` are mutually exclusive.
2. Load the Hugging Face model yourself, then wrap it:
   `hf_model = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", dtype=...)`
   and `TransformerBridge.boot_transformers(folder, hf_model=hf_model, tokenizer=tokenizer)`.
   Passing `device_map` together with `hf_model` raises a ValueError.

`device_map="auto"` (accelerate's big model inference) places whole layers on the GPUs
first, then in CPU memory, then on disk (Accelerate's "Big Model Inference" guide).
TransformerLens 4.3.0 rejects a map that mixes CPU or disk offload with GPUs, so give a
`max_memory` that keeps every layer on a GPU.

The hooks run on whichever device each layer lives on: the gate hook moves its layer's
gates to the activation's device and dtype (`HardConcreteMask._hook_fn` in
`tl_privacy/masks.py`), and the ablation hooks cache their 0/1 vector per device
(`tl_privacy/neurons.py`). The gates' parameters and the batches stay on one device, the
one of the model's first parameter (usually the embedding's GPU) unless
`LocalizationConfig(device=...)` names another. NOTE: whether the logits come back on that
device under a split, as the loss terms need, has not been checked.
"""


def write_gpu_notes(doc: Path = DOC) -> Path:
    """Write section ``gpu`` of ``doc``."""
    return write_section("gpu", "Running on GPUs", GPU_NOTES, doc=doc)


# ---- command line ----


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    parser.add_argument(
        "--models",
        type=parse_list,
        default=list(DEFAULT_MODELS),
        help="comma-separated models: tiny-N (N layers) or smollm2-135m "
        "(default: tiny-2,tiny-4,tiny-8,smollm2-135m)",
    )

    parser.add_argument(
        "--precisions",
        type=parse_list,
        default=list(PRECISIONS),
        help="comma-separated precisions: float32, bfloat16 (default: both)",
    )

    parser.add_argument(
        "--steps",
        type=int,
        default=MIN_TIMED_STEPS,
        help=f"timed steps per model and precision, at least {MIN_TIMED_STEPS} "
        f"(default: {MIN_TIMED_STEPS})",
    )

    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )

    parser.add_argument(
        "--no-isolate",
        action="store_true",
        help="measure every model in this process instead of one process each",
    )

    parser.add_argument(
        "--doc",
        type=Path,
        default=DOC,
        help="markdown file to write the section into (default: docs/benchmarks.md)",
    )

    parser.add_argument(
        "--gpu-notes", action="store_true", help="only write the GPU section, time nothing"
    )

    parser.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Raise SystemExit naming the invalid option."""
    if args.steps < MIN_TIMED_STEPS:
        raise SystemExit(f"error: --steps must be at least {MIN_TIMED_STEPS}, got {args.steps}")
    unknown = [p for p in args.precisions if p not in PRECISIONS]
    if unknown or not args.precisions:
        raise SystemExit(f"error: --precisions must be float32 and/or bfloat16, got {unknown}")
    try:
        for name in args.models:
            tiny_layers(name)
    except ValueError as error:
        raise SystemExit(f"error: --models: {error}") from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu_notes:
        print(f"wrote section gpu of {write_gpu_notes(args.doc)}")
        return
    check_args(args)
    if args.worker:
        measurement = measure(args.worker, args.precisions[0], args.steps, isolated=True)
        print(json.dumps(measurement.to_dict()))
        return
    measurements = run_scaling(
        args.models, args.precisions, args.steps, isolate=not args.no_isolate, threads=args.threads
    )
    report(measurements, args.steps, doc=args.doc)


if __name__ == "__main__":
    # The allocator settings of the tl-privacy command, so that the times match its runs.
    keep_freed_memory()
    main()
