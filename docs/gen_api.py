"""Generate docs/api.md from the package's signatures and docstrings.

Run from the project root after changing a public signature or docstring:
``.venv/bin/python docs/gen_api.py``.
"""
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

MODULES = [
    ("tl_privacy.hooks", "Hook names, model checks and hook bookkeeping"),
    ("tl_privacy.masks", "Hard-concrete gates"),
    ("tl_privacy.neurons", "Neuron sets: ablation and storage"),
    ("tl_privacy.objectives", "Loss terms of the localization objective"),
    ("tl_privacy.readout", "Logits at selected positions"),
    ("tl_privacy.attention", "Fused attention in evaluation"),
    ("tl_privacy.localization", "Localization"),
    ("tl_privacy.models", "Loading and building models"),
    ("tl_privacy.memorize", "Memorization fine-tune"),
    ("tl_privacy.precision", "bfloat16 autocast"),
    ("tl_privacy.allocator", "Allocator settings for CPU runs"),
    ("tl_privacy.extraction", "Greedy extraction"),
    ("tl_privacy.data.records", "Records"),
    ("tl_privacy.data.labelling", "Automatic labels"),
    ("tl_privacy.data.tokenization", "Tokenization with PII labels"),
    ("tl_privacy.data.synthetic", "Synthetic corpus"),
    ("tl_privacy.data.general", "General text"),
    ("tl_privacy.metrics", "Metrics"),
    ("tl_privacy.evaluation", "Evaluation"),
    ("tl_privacy.baselines", "Baselines"),
    ("tl_privacy.specificity", "Specificity"),
    ("tl_privacy.injection", "Ground truth: PII injected into known neurons"),
    ("tl_privacy.visualize", "circuitsvis views"),
    ("tl_privacy.redact", "Redaction"),
    ("tl_privacy.report", "HTML report"),
    ("tl_privacy.pipeline", "End-to-end runs"),
    ("tl_privacy.cli", "Command line"),
    ("tl_privacy.cache", "Cache folder"),
]

# Descriptions for members without a docstring.
MISSING = {
    "PrivacyNeurons.n_layers": "Number of layers of the mask.",
    "PrivacyNeurons.d_mlp": "Number of neurons per layer of the mask.",
    "PIICorpus.train_people": "The people whose records are trained on.",
    "PIICorpus.heldout_people": "The people whose records are held out.",
    "ExposureResult.ranks": "Rank of each ranked item, in item order.",
    "ExposureResult.exposure_mean": "Mean exposure of the ranked items, in bits (NaN with none).",
    "ExposureResult.mrr": "Mean reciprocal rank of the ranked items (NaN with none).",
    "ExposureResult.to_dict": "Return the result as JSON-ready values, with per-item ranks.",
    "ExtractionResult.overall": "Aggregate over all items.",
    "MemorizeResult.to_dict": "Return the result as a dict of JSON values.",
    "MemorizeResult.from_dict": "Read the form written by `to_dict`.",
    "StageRecorder.total": "Total wall time of all stages, in seconds.",
    "Run.stage": "The recorder's `stage` context manager.",
}

SKIP = {"RedactingFilter.filter", "ArgumentParser.error"}


def clean(text: str) -> str:
    text = re.sub(r":(?:func|class|meth|mod|attr):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def summary(obj, key: str) -> str:
    if key in MISSING:
        return MISSING[key]
    doc = inspect.getdoc(obj) or ""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    if not paragraph:
        raise SystemExit(f"no docstring and no description for {key}")
    first = re.split(r"(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z])", paragraph)[0]
    return clean(first if first.endswith((".", ":", "...")) else first + ".")


def format_default(value) -> str:
    if isinstance(value, float):
        return repr(round(value, 6))
    text = repr(value)
    if text.startswith("<") and "dtype" not in text:
        return getattr(value, "__name__", text)
    return text.replace("torch.float32", "torch.float32")


def render_signature(obj, drop_self: bool = False) -> str:
    signature = inspect.signature(obj)
    parts = []
    keyword_only_marked = False
    parameters = list(signature.parameters.values())
    if drop_self and parameters and parameters[0].name in ("self", "cls"):
        parameters = parameters[1:]
    for parameter in parameters:
        if parameter.kind is parameter.KEYWORD_ONLY and not keyword_only_marked:
            parts.append("*")
            keyword_only_marked = True
        if parameter.kind is parameter.VAR_POSITIONAL:
            parts.append(f"*{parameter.name}")
            keyword_only_marked = True
            continue
        if parameter.kind is parameter.VAR_KEYWORD:
            parts.append(f"**{parameter.name}")
            continue
        if parameter.default is parameter.empty:
            parts.append(parameter.name)
        else:
            parts.append(f"{parameter.name}={format_default(parameter.default)}")
    result = f"({', '.join(parts)})"
    annotation = signature.return_annotation
    if annotation is not signature.empty and annotation not in ("None", None):
        text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
        text = text.replace("'", '"')
        result += f" -> {text}"
    return result


def members(cls):
    for name, value in vars(cls).items():
        if name.startswith("_") or f"{cls.__name__}.{name}" in SKIP:
            continue
        if isinstance(value, property):
            yield name, value, "property"
        elif isinstance(value, classmethod):
            yield name, value.__func__, "classmethod"
        elif isinstance(value, staticmethod):
            yield name, value.__func__, "staticmethod"
        elif inspect.isfunction(value):
            yield name, value, "method"


def base_name(base) -> str:
    if base.__module__ in ("builtins",) or base.__module__.startswith("tl_privacy"):
        return base.__name__
    return f"{base.__module__.split('.')[0]}.{base.__name__}"


def render_class(cls) -> list[str]:
    lines = []
    bases = [base_name(b) for b in cls.__bases__ if b is not object]
    if dataclasses.is_dataclass(cls):
        signature = render_signature(cls)
        kind = "dataclass"
    elif issubclass(cls, BaseException):
        signature = ""
        kind = f"exception, subclass of `{bases[0]}`"
    else:
        init = cls.__dict__.get("__init__")
        signature = render_signature(init, drop_self=True) if init else "()"
        kind = "class" + (f", subclass of `{bases[0]}`" if bases else "")
    lines.append(f"- **`{cls.__name__}{signature}`** ({kind}). {summary(cls, cls.__name__)}")
    for name, value, kind in members(cls):
        key = f"{cls.__name__}.{name}"
        if kind == "property":
            lines.append(f"  - `.{name}` (property). {summary(value, key)}")
        else:
            tag = f" ({kind})" if kind != "method" else ""
            sig = render_signature(value, drop_self=True)
            lines.append(f"  - `.{name}{sig}`{tag}. {summary(value, key)}")
    return lines


def render_module(name: str, title: str) -> list[str]:
    module = importlib.import_module(name)
    doc = inspect.getdoc(module) or ""
    lines = [f"## {title}: `{name}`", "", clean(" ".join(doc.split("\n\n")[0].split())), ""]
    for attr, obj in vars(module).items():
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            lines += render_class(obj)
        elif inspect.isfunction(obj):
            lines.append(f"- **`{attr}{render_signature(obj)}`**. {summary(obj, attr)}")
    lines.append("")
    return lines


HEADER = """# API reference

The public classes and functions of tl-privacy, grouped by module, with their signatures and a
one-line description; the docstrings in the code have the details (shapes, units, errors).
`docs/concepts.md` defines the method and the metrics, `docs/usage.md` shows them in use.

Type annotations are left out of the signatures. A model is a TransformerLens model
(`TransformerBridge` or `HookedTransformer`), a tokenizer a Hugging Face tokenizer, and
`fwd_hooks` a list of `(hook name, hook function)` pairs as `run_with_hooks` takes them.

## The top-level package: `tl_privacy`

`tl_privacy` re-exports the core: `LocalizationConfig`, `localize`, `PrivacyNeurons`,
`IncompatibleNeuronsError`, `HardConcreteMask`, `UnsupportedModelError`, `attached`,
`check_model` and `mlp_post_name`. `tl_privacy.data` re-exports the public names of its
submodules (`load_records`, `make_batches`, `pii_items`, `generate_corpus`, ...).

"""


def main() -> None:
    lines = [HEADER]
    for name, title in MODULES:
        lines += render_module(name, title)
    text = "\n".join(lines).rstrip() + "\n"
    target = Path(__file__).resolve().parent / "api.md"
    with open(target, "w", encoding="utf-8") as handle:
        handle.write(text)


main()
