"""End-to-end runs of tl-privacy as named stages: the demo, ``localize`` and ``evaluate``.

A run loads or generates the records and loads the model. For ``tiny`` it trains a tokenizer
and memorizes the records first. It then localizes or loads the privacy neurons, evaluates
the clean and edited models, and writes ``results.json``, ``report.html`` and ``neurons/``
into the output folder. Each stage is timed, its peak resident memory is recorded, and it
logs one summary line on the ``tl_privacy`` logger.

Every model is evaluated once (the clean model, the ablated model, each baseline), and the
batches and PII items are built once and shared by all stages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import resource
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tl_privacy.cache import follow_umask, foreign_entries
from tl_privacy.data.general import keep_text
from tl_privacy.data.records import PIIRecord, add_automatic_labels, load_records
from tl_privacy.data.tokenization import PIIItem, make_batches, pii_items, type_names_for
from tl_privacy.hooks import check_model
from tl_privacy.neurons import IncompatibleNeuronsError, PrivacyNeurons
from tl_privacy.precision import autocast
from tl_privacy.redact import Redactor
from tl_privacy.report import write_report

logger = logging.getLogger("tl_privacy")

SMOLLM2 = "smollm2-135m"
TINY = "tiny"
DEMO_MODELS = (SMOLLM2, TINY)
BASELINE_METHODS = ("random", "activation", "integrated_gradients", "slimming")
RESULTS_FILE = "results.json"
NEURONS_FOLDER = "neurons"
# Entries of a tl-privacy output folder; a folder with anything else is not replaced.
OUTPUT_ENTRIES = (RESULTS_FILE, "report.html", NEURONS_FOLDER)

# Localization steps per model when --steps is not given. One SmolLM2 step (8 records of
# about 100 tokens, forward and backward under bfloat16) takes about 2 s on 2 CPU cores,
# and slimming takes as many steps, so SmolLM2's count sets most of the demo's time. With
# 60 steps few gates had moved far enough, and the 1% set cut extraction only to 42%.
DEFAULT_STEPS = {TINY: 200, SMOLLM2: 100}
FALLBACK_STEPS = 200

# Candidates per PII item for exposure and MRR when the config gives none. The tiny model
# has no KV cache, so each candidate costs forward passes over the whole prefix; 10
# candidates bound its exposure at log2(11) = 3.5 bits. 1,000 is the "Secret Sharer" value.
# SmolLM2 gets 100 (at most log2(101) = 6.66 bits): the demo evaluates six neuron sets, and
# 1,000 candidates cost about 20 s more per set once ablation lowers the true PII's score.
# NOTE: the candidate tries still cost up to 100 s for a set that makes the PII unlikely
# (integrated gradients' 1% set in the demo), because few candidates can be pruned then.
DEFAULT_CANDIDATES = {TINY: 10, SMOLLM2: 100}
FALLBACK_CANDIDATES = 1000

# Words per keep-only piece: about as long as a record (about 100 SmolLM2 tokens), and short
# enough for the tiny model's 256 positions with its corpus-trained tokenizer.
KEEP_PIECE_WORDS = 70

# Records per forward pass in evaluation: no backward pass, so twice the training batch.
EVALUATION_BATCH_FACTOR = 2


class InputError(ValueError):
    """Invalid user input (a path, a model name, a setting); the CLI exits with code 2."""


# ---- configuration ----


@dataclass
class RunConfig:
    """Settings of one run; which fields a command uses is noted per field.

    Attributes:
        out: output folder; replaced as a whole at the end of a successful run.
        model: ``"smollm2-135m"``, ``"tiny"`` or a local Hugging Face model folder.
        data: records file or saved ``datasets`` folder (``localize``, ``evaluate``).
        heldout: optional records never trained on, for held-out metrics (``evaluate``).
        neurons: a saved neuron set (``evaluate``).
        budget: upper bound on the privacy neurons, as a fraction of all MLP neurons.
        steps: localization steps; None takes ``DEFAULT_STEPS`` for the model.
        seed: seed of the corpus, the tiny model, the gate noise and the random baseline.
        show_pii: write PII unredacted into logs, results and report.
        n_people: people in the synthetic corpus of the demo (each has all four PII types).
        n_heldout_people: people whose records the demo never trains on.
        n_examples_per_type: qualitative examples per PII type.
        n_candidates: same-format candidates per PII item for exposure and MRR; None takes
            ``DEFAULT_CANDIDATES`` for the model.
        view_neurons: maximum number of neurons in the activation view.
        baselines: baseline methods the demo evaluates at the learned set's size.
        specificity: run per-type localization, Jaccard overlap and cross-ablation (demo).
        batch_size: records per batch in localization (evaluation runs twice as many).
        keep_text: add the essays of :func:`tl_privacy.data.keep_text` to the localization
            batches as keep-only batches (``demo`` and ``localize``). Without them the keep
            term reads only the records, whose text a memorizing model predicts from memory,
            and on SmolLM2 the 1% set raised general-text perplexity by 45%.
        heldout_exposure: measure the clean model's exposure of the held-out PII as well
            (``demo``, ``evaluate``; see ``EvaluationConfig.heldout_exposure``).
        precision: ``"auto"``, ``"bfloat16"`` or ``"float32"``: the autocast of
            localization, baselines and evaluation (see
            :func:`tl_privacy.precision.resolve_precision`).
        device: torch device; None keeps the model loader's default.
        show_progress: show progress bars.
    """

    out: Path = Path("tl-privacy-demo")
    model: str = SMOLLM2
    data: Path | None = None
    heldout: Path | None = None
    neurons: Path | None = None
    budget: float = 0.01
    steps: int | None = None
    seed: int = 0
    show_pii: bool = False
    n_people: int = 32
    n_heldout_people: int = 16
    n_examples_per_type: int = 2
    n_candidates: int | None = None
    view_neurons: int = 16
    baselines: tuple[str, ...] = BASELINE_METHODS
    specificity: bool = True
    batch_size: int = 8
    keep_text: bool = True
    heldout_exposure: bool = False
    precision: str = "auto"
    device: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out).expanduser()
        for name in ("data", "heldout", "neurons"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value).expanduser())

    def localization_steps(self) -> int:
        """Return ``steps`` or the default for the model."""
        if self.steps is not None:
            return self.steps
        return DEFAULT_STEPS.get(self.model, FALLBACK_STEPS)

    def per_type_steps(self) -> int:
        """Return the localization steps of each per-type set: a quarter of the main run's,
        so that the four per-type runs together cost about one main run."""
        return max(1, self.localization_steps() // 4)

    def candidates(self) -> int:
        """Return ``n_candidates`` or the default for the model."""
        if self.n_candidates is not None:
            return self.n_candidates
        return DEFAULT_CANDIDATES.get(self.model, FALLBACK_CANDIDATES)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON values (paths as strings)."""
        values = dataclasses.asdict(self)
        return {key: str(v) if isinstance(v, Path) else v for key, v in values.items()}


def validate(config: RunConfig, command: str) -> None:
    """Check ``config`` for ``command`` before anything is written.

    Raises:
        InputError: naming the invalid value and what to give instead.
    """
    check_budget(config.budget)
    if config.precision not in ("auto", "bfloat16", "float32"):
        raise InputError(
            f"precision must be 'auto', 'bfloat16' or 'float32', got {config.precision!r}"
        )
    if config.steps is not None and config.steps < 1:
        raise InputError(f"--steps must be at least 1, got {config.steps}")
    if config.n_people < 1:
        raise InputError(f"the corpus needs at least 1 person, got {config.n_people}")
    if command == "demo":
        from tl_privacy.data.synthetic import MAX_PEOPLE

        capacity = MAX_PEOPLE - config.n_heldout_people
        if config.n_people > capacity:
            raise InputError(
                f"--people {config.n_people} is more than the {capacity} people the synthetic "
                f"corpus can give distinct fictional phone numbers to; use at most {capacity}"
            )
    check_device(config.device)
    check_model_name(config.model, demo=command == "demo")

    if command in ("localize", "evaluate"):
        check_data_path(config.data, "--data")
    if command == "evaluate":
        if config.heldout is not None:
            check_data_path(config.heldout, "--heldout")
        if config.neurons is None or not (config.neurons / "config.json").is_file():
            inside = None if config.neurons is None else config.neurons / NEURONS_FOLDER
            hint = (
                f" (did you mean {inside}?)"
                if inside and (inside / "config.json").is_file()
                else ""
            )
            raise InputError(
                f"--neurons {config.neurons} is not a saved neuron set (no config.json in it); "
                f"give the neurons folder written by `tl-privacy localize`{hint}"
            )
    check_output_folder(config.out)


def check_device(device: str | None) -> None:
    """Raise InputError unless ``device`` is None or a torch device this machine has."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise InputError(
            f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N"
        ) from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"--device {device!r}: this machine has no CUDA device; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise InputError(
                f"--device {device!r}: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"--device {device!r}: MPS is not available here; use cpu")
    elif parsed.type != "cpu":
        raise InputError(f"--device {device!r} is not supported; use cpu, cuda or mps")


def check_budget(budget: float) -> None:
    """Raise InputError unless ``budget`` is a fraction strictly between 0 and 1."""
    if not 0.0 < budget < 1.0:
        raise InputError(
            f"--budget must be a fraction of all MLP neurons strictly between 0 and 1 "
            f"(0.01 = 1%), got {budget}"
        )


def check_model_name(model: str, *, demo: bool) -> None:
    """Raise InputError unless ``model`` names a known model or an existing model folder."""
    if model in DEMO_MODELS:
        return
    if demo:
        raise InputError(
            f"unknown model {model!r} for the demo; use one of {', '.join(DEMO_MODELS)}"
        )
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise InputError(
            f"unknown model {model!r}: it is neither {SMOLLM2!r}, {TINY!r} nor an existing "
            "local Hugging Face model folder"
        )
    if not (folder / "config.json").is_file():
        raise InputError(
            f"model folder {model!r} has no config.json; give a Hugging Face model folder"
        )


def check_data_path(path: Path | None, option: str) -> None:
    """Raise InputError unless ``path`` is an existing records file or data set folder."""
    if path is None:
        raise InputError(f"{option} is required: a JSONL, JSON, CSV or Parquet file of records")
    if not path.exists():
        raise InputError(
            f"{option} {path} does not exist; give a JSONL, JSON, CSV or Parquet file, or a "
            "folder saved by datasets"
        )


def check_output_folder(out: Path) -> None:
    """Raise InputError unless the run may write ``out``.

    ``out`` may be new, an empty folder, or an earlier tl-privacy output folder that contains
    only ``results.json``, ``report.html`` and ``neurons/``, which the run replaces. It must
    not be the working folder or one above it, and its nearest existing parent must be
    writable.
    """
    out = out.expanduser().resolve()
    if out.is_file():
        raise InputError(f"--out {out} is a file; give a folder path")
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        raise InputError(
            f"--out {out} is the working folder or contains it; give a new folder for the outputs"
        )
    others = foreign_entries(out, OUTPUT_ENTRIES)
    if others:
        raise InputError(
            f"--out {out} contains files that tl-privacy did not write ({others}); choose a new "
            "or empty folder"
        )
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(
            f"--out {out}: {existing} is not writable (read-only or no permission); choose "
            "another folder"
        )


# ---- stages, timing and memory ----


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class StageRecorder:
    """Times named stages, records their memory and logs one summary line per stage.

    ``timing[stage]`` is the wall time in seconds and ``cpu_time[stage]`` the CPU time of
    all the process' threads in seconds. On a shared machine the wall time grows with the
    other load, and the CPU time much less. ``memory[stage]`` has ``peak_rss_mib``
    (the process' peak resident memory at the end of the stage), ``peak_increase_mib`` (how
    much the stage raised that peak) and ``rss_mib`` (resident memory at its end).
    """

    def __init__(self) -> None:
        self.timing: dict[str, float] = {}
        self.cpu_time: dict[str, float] = {}
        self.memory: dict[str, dict[str, float | None]] = {}
        self._summary = ""

    @contextmanager
    def stage(self, name: str) -> Iterator[StageRecorder]:
        """Time the body as stage ``name``; call :meth:`summary` inside to set its log line."""
        self._summary = ""
        peak_before = _peak_rss_mib()
        start, cpu_start = time.perf_counter(), time.process_time()
        yield self
        seconds = time.perf_counter() - start
        peak_after = _peak_rss_mib()
        self.timing[name] = self.timing.get(name, 0.0) + seconds
        self.cpu_time[name] = self.cpu_time.get(name, 0.0) + time.process_time() - cpu_start
        self.memory[name] = {
            "peak_rss_mib": round(peak_after, 1),
            "peak_increase_mib": round(peak_after - peak_before, 1),
            "rss_mib": None if (rss := _current_rss_mib()) is None else round(rss, 1),
        }
        detail = f"{self._summary} " if self._summary else ""
        logger.info("[%s] %s(%.1f s, peak memory %.0f MiB)", name, detail, seconds, peak_after)

    def summary(self, message: str) -> None:
        """Set the summary line of the current stage."""
        self._summary = message

    def total(self) -> float:
        return sum(self.timing.values())


# ---- output folder ----


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield an empty folder next to ``out`` that replaces ``out`` when the block succeeds.

    On any error the staging folder, and any parent folders created for it, are removed,
    so a failed run leaves no output behind. An earlier output folder at ``out`` is kept
    until the new one is complete.
    """
    out = out.expanduser().resolve()
    try:
        created = _make_parents(out.parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as error:
        raise InputError(
            f"--out {out} cannot be written ({error.strerror}); choose another folder"
        ) from None
    follow_umask(staging)
    try:
        yield staging
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` with ``staging``; keep an earlier ``out`` until the rename succeeded."""
    try:
        if out.exists():
            previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
            os.replace(out, previous)
            os.replace(staging, out)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, out)
    except OSError as error:
        raise InputError(
            f"could not move the outputs into --out {out} ({error.strerror}); choose a folder "
            "that is not a mount point"
        ) from None


def _make_parents(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
    return list(reversed(missing))


# ---- run state ----


@dataclass
class Run:
    """State shared by the stages of one run: model, data, batches, items and the recorder."""

    config: RunConfig
    command: str
    recorder: StageRecorder = field(default_factory=StageRecorder)
    redactor: Redactor = field(default_factory=Redactor)
    results: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    tokenizer: Any = None
    model_name: str = ""
    train: list[PIIRecord] = field(default_factory=list)
    heldout: list[PIIRecord] = field(default_factory=list)
    batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    keep_batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    items: list[PIIItem] = field(default_factory=list)
    neurons: PrivacyNeurons | None = None
    localization_config: Any = None
    # The unmasked model's keep-position predictions on [*batches, *keep_batches], kept from
    # the main localization for slimming and the per-type runs of specificity, then freed.
    references: Any = None
    evaluations: dict[str, Any] = field(default_factory=dict)
    workdir: Path | None = None

    @property
    def stage(self):
        return self.recorder.stage


def start_run(config: RunConfig, command: str, redactor: Redactor | None = None) -> Run:
    """Create the shared state of a run and seed the global RNGs with ``config.seed``."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    redactor = redactor if redactor is not None else Redactor()
    redactor.enabled = not config.show_pii
    run = Run(config=config, command=command, redactor=redactor)
    run.results = {
        "command": command,
        "show_pii": config.show_pii,
        "config": config.to_dict(),
    }
    return run


# ---- stage: data ----


def load_demo_data(run: Run) -> None:
    """Generate the synthetic corpus: ``n_people`` training and held-out senders."""
    from tl_privacy.data.synthetic import SyntheticCorpusConfig, generate_corpus

    config = run.config
    with run.stage("data") as stage:
        corpus = generate_corpus(
            SyntheticCorpusConfig(
                n_people=config.n_people,
                n_heldout_people=config.n_heldout_people,
                seed=config.seed,
            )
        )
        _set_records(run, corpus.train, corpus.heldout)
        stage.summary(
            f"{len(corpus.train_people)} people in {len(run.train)} training records, "
            f"{len(run.heldout)} held-out records"
        )
    run.results["data"]["source"] = "synthetic"
    run.results["data"]["n_people"] = len(corpus.train_people)


def load_user_data(run: Run) -> None:
    """Load ``--data`` and ``--heldout``; records with ``meta.split == "heldout"`` are held out."""
    config = run.config
    with run.stage("data") as stage:
        records = load_records(config.data, auto_label=False)
        if records and not any(record.spans for record in records):
            records = [add_automatic_labels(record) for record in records]
            found = Counter(span.type for record in records for span in record.spans)
            logger.info(
                "--data has no PII spans, so e-mail addresses and phone numbers were labelled "
                "automatically: %s",
                ", ".join(f"{count} {kind}" for kind, count in sorted(found.items())) or "none",
            )
        if not records:
            raise InputError(
                f"--data {config.data} contains no records; give a file with at least one "
                "record that has a 'text' field"
            )
        train = [r for r in records if r.meta.get("split") != "heldout"]
        heldout = [r for r in records if r.meta.get("split") == "heldout"]
        if config.heldout is not None:
            heldout += load_records(config.heldout)
        if not train:
            raise InputError(
                f"--data {config.data} has only held-out records; nothing to localize on"
            )
        if not any(record.spans for record in train):
            raise InputError(
                f"--data {config.data} has no PII spans and none were found automatically; "
                "label the PII with 'spans' (start, end, type)"
            )
        _set_records(run, train, heldout)
        stage.summary(f"{len(train)} records, {len(heldout)} held-out records")
    run.results["data"]["source"] = str(config.data)


def _set_records(run: Run, train: list[PIIRecord], heldout: list[PIIRecord]) -> None:
    run.train, run.heldout = list(train), list(heldout)
    run.redactor.add_records([*run.train, *run.heldout])
    spans = [span.type for record in run.train for span in record.spans]
    run.results["data"] = {
        "n_train_records": len(run.train),
        "n_heldout_records": len(run.heldout),
        "spans_by_type": {t: spans.count(t) for t in dict.fromkeys(spans)},
    }


# ---- stage: model ----


def load_run_model(run: Run) -> None:
    """Load the model, or build the tiny one with a tokenizer trained on the records."""
    from tl_privacy.data.general import general_text
    from tl_privacy.models import load_model, tiny_model, train_tokenizer

    config = run.config
    with run.stage("model") as stage:
        if config.model == TINY:
            # Intra-op threads only add overhead at this size, and much more so on a shared
            # machine. NOTE: this sets torch's thread count for the whole process.
            torch.set_num_threads(1)
            run.workdir = Path(tempfile.mkdtemp(prefix="tl-privacy-tokenizer-"))
            # General prose in the tokenizer's training text keeps general-text perplexity
            # from being measured on single bytes.
            # Training records only: evaluate with another --heldout file then builds the
            # same tokenizer, and so the same model, as localize did.
            texts = [record.text for record in run.train]
            texts += general_text().split("\n\n")
            run.tokenizer = train_tokenizer(texts, run.workdir / "tokenizer")
            run.model = tiny_model(run.tokenizer, seed=config.seed)
            if config.device:
                run.model.to(config.device)
            run.model_name = TINY
        else:
            try:
                run.model = load_model(config.model, device=config.device)
            except (OSError, ValueError) as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
                raise InputError(
                    f"could not load the model {config.model!r}: {first}; give a complete Hugging "
                    "Face model folder (config.json, tokenizer files and weights)"
                ) from None
            run.tokenizer = run.model.tokenizer
            run.model_name = config.model if config.model == SMOLLM2 else Path(config.model).name
        n_layers, d_mlp = check_model(run.model)
        parameters = sum(p.numel() for p in run.model.parameters())
        stage.summary(
            f"{run.model_name}: {n_layers} layers x {d_mlp} MLP neurons, "
            f"{parameters / 1e6:.1f}M parameters"
        )
    run.results["model"] = {
        "name": run.model_name,
        "n_layers": n_layers,
        "d_mlp": d_mlp,
        "n_neurons": n_layers * d_mlp,
        "parameters": parameters,
    }


def memorize_records(run: Run) -> None:
    """Fine-tune the model on the training records until it has memorized them (cached)."""
    from tl_privacy.memorize import MemorizeConfig, memorize

    with run.stage("memorize") as stage:
        config = MemorizeConfig(seed=run.config.seed, show_progress=run.config.show_progress)
        # With held-out records memorize also reports how much of them the model extracts.
        corpus = SimpleNamespace(train=run.train, heldout=run.heldout)
        outcome = memorize(run.model, corpus, config)
        info = {key: v for key, v in outcome.to_dict().items() if _is_json_scalar(v)}
        cached = " (cached)" if info.get("cached") else ""
        stage.summary(
            f"{info.get('steps')} steps{cached}, exact extraction "
            f"{_percent(info.get('extraction_exact'))}"
        )
    _warn_if_not_memorized(info.get("extraction_exact"))
    info.pop("cache_path", None)
    run.results["memorization"] = info


# ---- stage: batches and items ----


def prepare_batches(run: Run) -> None:
    """Tokenize the training records into batches and cut the PII items, once per run.

    With ``keep_text`` the essays of :func:`tl_privacy.data.keep_text` become extra batches
    without PII, one record per paragraph, so the gates and slimming keep the model's
    predictions on ordinary English as well as on the records.
    """
    with run.stage("tokenize") as stage:
        type_names = type_names_for([*run.train, *run.heldout])
        run.batches = make_batches(
            run.tokenizer, run.train, run.config.batch_size, type_names=type_names
        )
        run.keep_batches = []
        if run.config.keep_text:
            # Longest first, so that each batch contains pieces of similar length. In text
            # order each batch pads to its longest piece: the demo's keep batches had 1,380
            # tokens in 1,864 positions that way, and in 1,568 sorted.
            texts = keep_pieces(keep_text())
            lengths = [len(run.tokenizer(text)["input_ids"]) for text in texts]
            order = sorted(range(len(texts)), key=lambda i: -lengths[i])
            pieces = [PIIRecord(text=texts[i]) for i in order]
            run.keep_batches = make_batches(
                run.tokenizer, pieces, run.config.batch_size, type_names=type_names
            )
        run.items = pii_items(run.tokenizer, run.train)
        tokens = sum(int(batch["attention_mask"].sum()) for batch in run.batches)
        keep = sum(int(batch["attention_mask"].sum()) for batch in run.keep_batches)
        stage.summary(
            f"{len(run.batches)} batches, {tokens} tokens, {len(run.items)} PII items; "
            f"{len(run.keep_batches)} keep-only batches, {keep} tokens"
        )
    run.results["data"]["n_pii_items"] = len(run.items)
    run.results["data"]["type_names"] = list(type_names)


def keep_pieces(text: str, max_words: int = KEEP_PIECE_WORDS) -> list[str]:
    """Cut ``text`` into pieces of whole sentences, at most ``max_words`` words where a
    sentence allows, never across a paragraph."""
    pieces = []
    for paragraph in text.split("\n\n"):
        current: list[str] = []
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph.strip()):
            words = sum(len(part.split()) for part in current)
            if current and words + len(sentence.split()) > max_words:
                pieces.append(" ".join(current))
                current = []
            current.append(sentence)
        if current:
            pieces.append(" ".join(current))
    return [piece for piece in pieces if piece]


# ---- stage: localize ----


def localize_neurons(run: Run) -> None:
    """Train the hard-concrete gates and select the set, at most ``budget`` of all neurons."""
    from tl_privacy.localization import LocalizationConfig, ReferenceCache, localize

    config = run.config
    with run.stage("localize") as stage:
        settings = LocalizationConfig(
            steps=config.localization_steps(),
            budget=config.budget,
            seed=config.seed,
            batch_size=config.batch_size,
            type_names=tuple(run.results["data"]["type_names"]),
            precision=config.precision,
            show_progress=config.show_progress,
        )
        run.localization_config = settings
        references = ReferenceCache(settings.reference_cache_mb)
        data = [*run.batches, *run.keep_batches]
        run.neurons = localize(
            run.model, data, settings, model_name=run.model_name, references=references
        )
        # Only the demo's slimming baseline and specificity stage read the references
        # again. They take keep positions x vocabulary x 2 bytes (96 KiB per position on
        # SmolLM2), so other runs free them here.
        if run.command == "demo" and (config.specificity or "slimming" in config.baselines):
            run.references = references
        stage.summary(
            f"{run.neurons.count} privacy neuron{'' if run.neurons.count == 1 else 's'} "
            f"({run.neurons.fraction:.3%} of all), "
            f"by layer {run.neurons.by_layer()}"
        )
    run.results["privacy_neurons"] = neuron_summary(run.neurons, config.budget)


def load_neurons(run: Run) -> None:
    """Load the ``--neurons`` set, check its shape against the model and warn when it was
    localized on other weights."""
    with run.stage("neurons") as stage:
        try:
            run.neurons = PrivacyNeurons.load(run.config.neurons, model=run.model)
        except IncompatibleNeuronsError as error:
            raise InputError(f"--neurons {run.config.neurons}: {error}") from None
        except (ValueError, FileNotFoundError) as error:
            raise InputError(
                f"--neurons {run.config.neurons} is not a valid neuron set: {error}"
            ) from None
        run.neurons.warn_if_other_weights(run.model, run.model_name, run.config.neurons)
        stage.summary(f"{run.neurons.count} neurons from {run.config.neurons}")
    run.results["privacy_neurons"] = neuron_summary(run.neurons, None)


def neuron_summary(neurons: PrivacyNeurons, budget: float | None) -> dict[str, Any]:
    """Return the ``privacy_neurons`` entry of results.json."""
    return {
        "method": neurons.method,
        "count": neurons.count,
        "fraction": neurons.fraction,
        "budget": budget,
        "by_layer": neurons.by_layer(),
        "path": NEURONS_FOLDER,
    }


# ---- stage: evaluate ----


def evaluation_config(run: Run) -> Any:
    """Return the evaluation settings shared by every model of the run."""
    from tl_privacy.evaluation import EvaluationConfig

    return EvaluationConfig(
        n_candidates=run.config.candidates(),
        batch_size=run.config.batch_size * EVALUATION_BATCH_FACTOR,
        seed=run.config.seed,
        precision=run.config.precision,
    )


def evaluate_models(run: Run) -> None:
    """Evaluate the clean model and the model with the privacy neurons ablated, once each."""
    from tl_privacy.evaluation import compare

    with run.stage("evaluate") as stage:
        hook_sets = {"clean": [], "ablated": run.neurons.ablation_hooks()}
        progress = _progress(run, list(hook_sets), "evaluate")
        evaluations = {}
        for name in progress:
            progress.set_postfix(model=name)
            # Held-out exposure shows what the context gives away; the clean model suffices.
            heldout_exposure = run.config.heldout_exposure and name == "clean"
            evaluations[name] = _evaluate(run, hook_sets[name], heldout_exposure)
        clean, ablated = evaluations["clean"], evaluations["ablated"]
        stage.summary(
            f"exact extraction {_percent(clean.extraction_exact)} -> "
            f"{_percent(ablated.extraction_exact)}, general perplexity "
            f"{_number(clean.perplexity_general)} -> {_number(ablated.perplexity_general)}"
        )
    _warn_if_not_memorized(clean.extraction_exact)
    run.evaluations = {"clean": clean, "ablated": ablated}
    metrics = run.results.setdefault("metrics", {})
    metrics["clean"] = _metrics_json(clean, run.config.show_pii)
    metrics["ablated"] = _metrics_json(ablated, run.config.show_pii)
    metrics["change"] = _without_none_rows(compare(clean, ablated))


def _evaluate(run: Run, fwd_hooks: list, heldout_exposure: bool = False) -> Any:
    from tl_privacy.evaluation import evaluate

    config = dataclasses.replace(evaluation_config(run), heldout_exposure=heldout_exposure)
    return evaluate(
        run.model,
        run.tokenizer,
        run.train,
        run.heldout,
        fwd_hooks=fwd_hooks,
        config=config,
    )


def _metrics_json(result: Any, show_pii: bool) -> dict[str, Any]:
    """Return an evaluation's ``to_dict()`` for results.json.

    Per-item rows lose their ``pii`` and ``decoded`` fields (the PII and the model's guess
    at it) unless ``show_pii`` is set.
    """
    values = dict(result.to_dict())
    if not show_pii:
        hidden = ("pii", "decoded")
        values["items"] = [
            {key: value for key, value in row.items() if key not in hidden}
            for row in values["items"]
        ]
    return values


def _without_none_rows(changes: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in changes.items() if value is not None}


def evaluate_baselines(run: Run) -> None:
    """Select each baseline's neurons at exactly the learned set's size and evaluate them.

    With an empty learned set every baseline ablates nothing, so each gets the clean
    model's metrics instead of a second identical evaluation.
    """
    from tl_privacy.baselines import BaselineConfig, select

    k = run.neurons.count
    metrics = run.results.setdefault("metrics", {}).setdefault("baselines", {})
    summaries = run.results["privacy_neurons"].setdefault("baselines", {})
    # The stage's own bar counts the methods, so the methods' inner bars stay off.
    settings = BaselineConfig.from_localization(run.localization_config, show_progress=False)
    with run.stage("baselines") as stage:
        methods = _progress(run, run.config.baselines, "baselines")
        for method in methods:
            methods.set_postfix(method=method)
            if k == 0:
                metrics[method] = _metrics_json(run.evaluations["clean"], run.config.show_pii)
                summaries[method] = {"count": 0, "by_layer": [0] * run.neurons.n_layers}
                continue
            # The objective-based baseline gets the keep-only batches too; the others read
            # PII positions, which those batches do not have.
            data = [*run.batches, *run.keep_batches] if method == "slimming" else run.batches
            chosen = select(
                method,
                run.model,
                data,
                k,
                seed=run.config.seed,
                config=settings,
                references=run.references,
            )
            evaluation = _evaluate(run, chosen.ablation_hooks())
            metrics[method] = _metrics_json(evaluation, run.config.show_pii)
            summaries[method] = {
                "count": chosen.count,
                "by_layer": chosen.by_layer(),
                "jaccard_with_learned": chosen.jaccard(run.neurons),
                "selection_seconds": chosen.stats.get("wall_time_s"),
                "evaluation_seconds": evaluation.seconds,
            }
        if not run.config.specificity:
            run.references = None
        listed = ", ".join(
            f"{method} {_percent(values.get('extraction_exact'))}"
            for method, values in metrics.items()
        )
        stage.summary(f"{k} neurons each; exact extraction: {listed}")


# ---- stage: specificity ----


def measure_specificity(run: Run) -> None:
    """Localize each PII type alone, compare the sets, and ablate each set across types.

    Each type's set has exactly as many neurons as the learned set (its top-ranked gates)
    and a quarter of its steps (``RunConfig.per_type_steps``), because four per-type runs
    would otherwise cost four times the main localization.
    Cross-ablation measures exact extraction per type with each set ablated, plus a
    ``"none"`` row for the clean model.
    """
    from tl_privacy.specificity import jaccard_matrix, localize_by_type

    config = run.config
    # Each type's set has exactly the learned set's size, as the baselines do, so that the
    # overlaps compare sets of one size and no search pass is spent per type.
    size = max(1, run.neurons.count)
    settings = dataclasses.replace(
        run.localization_config,
        steps=config.per_type_steps(),
        selection="budget",
        budget=size / run.results["model"]["n_neurons"],
        show_progress=False,
    )
    present = {item.type for item in run.items}
    types = [name for name in settings.type_names if name in present]
    with run.stage("specificity") as stage:
        sets: dict[str, PrivacyNeurons] = {}
        progress = _progress(run, types, "specificity")
        for pii_type in progress:
            progress.set_postfix(type=pii_type)
            data = [*run.batches, *run.keep_batches]
            sets.update(
                localize_by_type(
                    run.model, data, settings, types=[pii_type], references=run.references
                )
            )
        run.references = None
        with autocast(run.model, config.precision):
            cross = cross_ablation_teacher_forced(run.model, run.tokenizer, run.train, sets)
        counts = {name: neurons.count for name, neurons in sets.items()}
        own = ", ".join(
            f"{name} {_percent(cross['none'].get(name))} -> {_percent(cross[name].get(name))}"
            for name in sets
        )
        stage.summary(f"per-type sets {counts}; own-type exact extraction {own}")
    run.results["specificity"] = {
        "types": list(sets),
        "steps": settings.steps,
        "counts": counts,
        "by_layer": {name: neurons.by_layer() for name, neurons in sets.items()},
        "jaccard": jaccard_matrix(sets),
        "jaccard_with_learned": {
            name: neurons.jaccard(run.neurons) for name, neurons in sets.items()
        },
        "cross_ablation": cross,
        "cross_ablation_measure": "teacher-forced exact match",
    }


def cross_ablation_teacher_forced(
    model: Any,
    tokenizer: Any,
    records: Sequence[PIIRecord],
    sets: dict[str, PrivacyNeurons],
) -> dict[str, dict[str, float]]:
    """Return ``result[ablated][measured]``: exact extraction of each type with a set ablated.

    Row ``"none"`` is the clean model. Exact extraction is decided by teacher forcing on the
    records' own forward pass (``ItemScore.exact`` of :func:`tl_privacy.metrics.record_metrics`),
    which agrees with greedy decoding up to ties between logits at one pass per batch of
    records, where :func:`tl_privacy.specificity.cross_ablation` decodes token by token.
    """
    from tl_privacy.metrics import record_metrics

    rows = {"none": [], **{name: neurons.ablation_hooks() for name, neurons in sets.items()}}
    result = {}
    for name, hooks in rows.items():
        metrics = record_metrics(model, tokenizer, records, fwd_hooks=hooks)
        types = [item.type for item in metrics.items]
        # Columns in the order of the rows, so a type-specific set shows on the diagonal.
        present = dict.fromkeys(types)
        order = [t for t in sets if t in present] + [t for t in present if t not in sets]
        exact = [score.exact for score in metrics.item_scores]
        result[name] = {
            t: sum(e for e, kind in zip(exact, types, strict=True) if kind == t) / types.count(t)
            for t in order
        }
    return result


# ---- stage: examples ----


def collect_examples(run: Run) -> None:
    """Pick a few PII items per type with the clean and ablated model's greedy output.

    The greedy outputs come from the evaluation's per-item rows, so nothing is decoded again.
    """
    clean_rows = run.evaluations["clean"].items
    ablated_rows = run.evaluations["ablated"].items
    with run.stage("examples") as stage:
        pairs = list(zip(clean_rows, ablated_rows, strict=True))
        chosen = choose_examples(pairs, run.config.n_examples_per_type)
        examples = [_example(run, clean, ablated) for clean, ablated in chosen]
        exact = sum(example["clean_exact"] for example in examples)
        still = sum(example["ablated_exact"] for example in examples)
        stage.summary(f"{len(examples)} examples, {exact} exact before and {still} after ablation")
    run.results["examples"] = examples


def choose_examples(
    pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]], per_type: int
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Choose up to ``per_type`` (clean row, ablated row) pairs of each PII type.

    Items that the clean model extracts and the ablated model does not come first, then
    items extracted by both, then the rest, so the examples show what ablation changed
    where it changed anything. Within a type each example comes from another record.
    """

    def rank(pair: tuple[dict[str, Any], dict[str, Any]]) -> int:
        clean, ablated = pair
        if clean["exact"] and not ablated["exact"]:
            return 0
        return 1 if clean["exact"] else 2

    chosen: list[tuple[dict[str, Any], dict[str, Any]]] = []
    records: dict[str, set[int]] = {}
    for pair in sorted(pairs, key=rank):
        pii_type, record = pair[0]["type"], pair[0]["record_index"]
        used = records.setdefault(pii_type, set())
        if len(used) >= per_type or record in used:
            continue
        used.add(record)
        chosen.append(pair)
    order = list(dict.fromkeys(pair[0]["type"] for pair in pairs))
    return sorted(chosen, key=lambda pair: order.index(pair[0]["type"]))


def _example(run: Run, clean: dict[str, Any], ablated: dict[str, Any]) -> dict[str, Any]:
    record = run.train[clean["record_index"]]
    span = record.spans[clean["span_index"]]
    redactor = run.redactor
    return {
        "record_id": record.record_id,
        "type": clean["type"],
        "prefix": _tail(redactor.redact_record(record, end=span.start), 80),
        "target": f"[{clean['type']}]" if redactor.enabled else clean["pii"],
        "clean": redactor.redact_generated(clean["decoded"]),
        "ablated": redactor.redact_generated(ablated["decoded"]),
        "clean_exact": bool(clean["exact"]),
        "ablated_exact": bool(ablated["exact"]),
        "clean_similarity": clean.get("similarity"),
        "ablated_similarity": ablated.get("similarity"),
    }


def _tail(text: str, length: int) -> str:
    return text if len(text) <= length else "\u2026" + text[-length:]


# ---- stage: neuron view ----


def collect_neuron_view(run: Run) -> None:
    """Record the privacy neurons' activations on example records for the report's view."""
    from tl_privacy.visualize import neuron_activations

    if run.neurons is None or run.neurons.count == 0:
        return
    with run.stage("neuron view") as stage:
        records = run.train[:2] + run.heldout[:1]
        if run.redactor.enabled:
            # Automatic labels catch e-mail addresses and phone numbers the data left unlabelled.
            records = [add_automatic_labels(run.redactor.label_known(r)) for r in records]
        titles = [f"training record {r.record_id or i}" for i, r in enumerate(run.train[:2])]
        titles += [f"held-out record {r.record_id or 'h'}" for r in run.heldout[:1]]
        data = neuron_activations(
            run.model,
            run.tokenizer,
            records,
            run.neurons,
            run.config.view_neurons,
            redact=run.redactor.enabled,
            titles=titles,
        )
        stage.summary(f"{len(data.neuron_labels)} neurons on {len(records)} records")
    run.results["neuron_view"] = data.to_dict()


# ---- stage: write ----


def write_outputs(run: Run, folder: Path) -> None:
    """Write ``neurons/``, ``results.json`` and ``report.html`` into ``folder``."""
    with run.stage("write"):
        if run.neurons is not None:
            run.neurons.save(folder / NEURONS_FOLDER)
        run.results["timing"] = {**run.recorder.timing, "total": run.recorder.total()}
        cpu_time = run.recorder.cpu_time
        run.results["cpu_time"] = {**cpu_time, "total": sum(cpu_time.values())}
        run.results["memory"] = run.recorder.memory
        write_results(run.results, folder)
        write_report(run.results, folder)


def write_results(results: dict[str, Any], folder: Path) -> Path:
    """Write ``results`` as ``folder/results.json``."""
    path = folder / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return path


def read_results(folder: Path) -> dict[str, Any]:
    """Read ``folder/results.json`` for a report.

    Raises InputError when the folder or file is missing, the file is not valid JSON, or it
    lacks an entry of ``tl_privacy.report.REQUIRED_ENTRIES``, so no empty report is written.
    """
    from tl_privacy.report import missing_entries

    path = Path(folder) / RESULTS_FILE
    if not Path(folder).exists():
        raise InputError(f"{folder} does not exist; give the --out folder of a tl-privacy run")
    if not Path(folder).is_dir():
        raise InputError(f"{folder} is a file; give the --out folder of a tl-privacy run")
    if not path.is_file():
        raise InputError(f"{folder} has no {RESULTS_FILE}; give a folder written by tl-privacy")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON ({error}); rerun the command") from None

    rerun = (
        f"run `tl-privacy demo --out {folder}` or `tl-privacy evaluate ... --out {folder}` "
        f"first, which write a complete {RESULTS_FILE} and the report"
    )
    if not isinstance(results, dict):
        raise InputError(
            f"{path} contains a JSON {type(results).__name__}, not the object tl-privacy "
            f"writes; {rerun}"
        )
    missing = missing_entries(results)
    if missing:
        raise InputError(
            f"{path} lacks the entries {', '.join(repr(entry) for entry in missing)}, so there is "
            f"nothing to report; {rerun}"
        )
    return results


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


# ---- commands ----


def run_demo(config: RunConfig, redactor: Redactor | None = None) -> dict[str, Any]:
    """Run the whole pipeline on the synthetic corpus and write the output folder."""
    validate(config, "demo")
    run = start_run(config, "demo", redactor)
    try:
        with staged_output(config.out) as folder:
            load_demo_data(run)
            load_run_model(run)
            memorize_records(run)
            prepare_batches(run)
            localize_neurons(run)
            evaluate_models(run)
            evaluate_baselines(run)
            if config.specificity:
                measure_specificity(run)
            collect_examples(run)
            collect_neuron_view(run)
            write_outputs(run, folder)
    finally:
        _cleanup(run)
    return run.results


def run_localize(config: RunConfig, redactor: Redactor | None = None) -> dict[str, Any]:
    """Localize the privacy neurons of the user's records and write the set and results."""
    validate(config, "localize")
    run = start_run(config, "localize", redactor)
    try:
        with staged_output(config.out) as folder:
            load_user_data(run)
            load_run_model(run)
            if config.model == TINY:
                memorize_records(run)
            prepare_batches(run)
            localize_neurons(run)
            measure_extraction(run)
            write_outputs(run, folder)
    finally:
        _cleanup(run)
    return run.results


def run_evaluate(config: RunConfig, redactor: Redactor | None = None) -> dict[str, Any]:
    """Evaluate a saved neuron set on the user's records and write results and report."""
    validate(config, "evaluate")
    run = start_run(config, "evaluate", redactor)
    try:
        with staged_output(config.out) as folder:
            load_user_data(run)
            load_run_model(run)
            if config.model == TINY:
                memorize_records(run)
            load_neurons(run)
            prepare_batches(run)
            evaluate_models(run)
            collect_examples(run)
            collect_neuron_view(run)
            write_outputs(run, folder)
    finally:
        _cleanup(run)
    return run.results


def measure_extraction(run: Run) -> None:
    """Measure exact extraction before and after ablation with one teacher-forced pass each."""
    from tl_privacy.extraction import exact_match_teacher_forced

    with run.stage("extraction") as stage:
        clean = exact_match_teacher_forced(run.model, run.items)
        ablated = exact_match_teacher_forced(
            run.model, run.items, fwd_hooks=run.neurons.ablation_hooks()
        )
        before, after = float(clean.float().mean()), float(ablated.float().mean())
        stage.summary(f"exact extraction {_percent(before)} -> {_percent(after)}")
    _warn_if_not_memorized(before)
    run.results["metrics"] = {
        "clean": {"extraction_exact": before},
        "ablated": {"extraction_exact": after},
    }


# Below this exact-extraction rate of the clean model, a warning is logged: the neurons mean little.
MEMORIZED_ENOUGH = 0.5


def _warn_if_not_memorized(extraction: float | None) -> None:
    if extraction is not None and extraction < MEMORIZED_ENOUGH:
        logger.warning(
            "the model reproduces only %s of the PII from its prefix; it has not memorized "
            "the records, so the neurons found say little (see docs/usage.md)",
            _percent(extraction),
        )


def rerender_report(folder: Path) -> Path:
    """Render ``folder/report.html`` again from ``folder/results.json``."""
    return write_report(read_results(folder), folder)


def headline_table(results: dict[str, Any]) -> str:
    """Return a plain-text table: clean vs ablated vs baselines on the headline metrics."""
    metrics = results.get("metrics", {})
    neurons = results.get("privacy_neurons", {})
    rows = [("clean", 0, metrics.get("clean"))]
    rows.append(("ablated (learned)", neurons.get("count"), metrics.get("ablated")))
    for method, values in metrics.get("baselines", {}).items():
        count = neurons.get("baselines", {}).get(method, {}).get("count")
        rows.append((method, count, values))

    header = (
        f"{'':<22}{'neurons':>8}{'extraction':>12}{'exposure':>10}{'MRR':>8}{'general ppl':>13}"
    )
    lines = [header]
    for label, count, values in rows:
        if not values:
            continue
        lines.append(
            f"{label:<22}{_number(count, 0):>8}{_percent(values.get('extraction_exact')):>12}"
            f"{_number(values.get('exposure_mean')):>10}{_number(values.get('mrr'), 3):>8}"
            f"{_number(values.get('perplexity_general')):>13}"
        )
    return "\n".join(lines)


def _progress(run: Run, steps: Sequence[str], stage: str) -> Any:
    """Return a tqdm bar over ``steps`` named after the stage, off without ``show_progress``."""
    from tqdm.auto import tqdm

    return tqdm(steps, desc=stage, disable=not run.config.show_progress)


def _cleanup(run: Run) -> None:
    if run.workdir is not None:
        shutil.rmtree(run.workdir, ignore_errors=True)


def _percent(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.1%}"


def _number(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))
