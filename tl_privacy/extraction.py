"""Greedy extraction of memorized PII: decode from each PII item's prefix and compare.

An item counts as extracted when greedy (argmax) decoding from the tokens before the PII
reproduces the PII string exactly. ``extraction_scores`` decodes and also reports the
character similarity of partial recalls. ``exact_match_teacher_forced`` decides exact
extraction with one forward pass per batch instead of one per generated token. That works
because greedy decoding reproduces the target tokens if and only if the argmax at every target
position, given the true tokens before it, is the true next token.
"""

from __future__ import annotations

import difflib
import logging
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from tl_privacy.attention import is_fused
from tl_privacy.data.tokenization import PIIItem, pad_token_id
from tl_privacy.hooks import attached
from tl_privacy.models import model_id

logger = logging.getLogger("tl_privacy")

# Result of _kv_cache_mode() per model and attention path (fused or not). Weak keys let the
# models be freed.
_KV_CACHE_MODE: weakref.WeakKeyDictionary[torch.nn.Module, dict[bool, str | None]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class ItemExtraction:
    """The greedy decoding of one PII item and how close it came to the PII.

    ``target`` and ``decoded`` are the decoded target tokens and the decoded generated tokens,
    both stripped of surrounding whitespace. ``similarity`` is difflib's
    ``SequenceMatcher.ratio()`` of the two, from 0 (nothing in common) to 1 (equal).
    """

    record_index: int
    span_index: int
    type: str
    target: str
    decoded: str
    exact: bool
    similarity: float


@dataclass(frozen=True)
class TypeExtraction:
    """Extraction aggregated over the items of one PII type (or over all items)."""

    n_items: int
    exact_rate: float
    similarity: float


@dataclass(frozen=True)
class ExtractionResult:
    """Per-item greedy extraction results with their aggregates."""

    items: list[ItemExtraction]

    @property
    def overall(self) -> TypeExtraction:
        return _aggregate(self.items)

    @property
    def exact_rate(self) -> float:
        """Fraction of items whose PII greedy decoding reproduced exactly (0 with no items)."""
        return self.overall.exact_rate

    @property
    def similarity(self) -> float:
        """Mean character similarity over items (0 with no items)."""
        return self.overall.similarity

    def by_type(self) -> dict[str, TypeExtraction]:
        """Aggregate per PII type, in order of first appearance."""
        types = dict.fromkeys(item.type for item in self.items)
        return {t: _aggregate([item for item in self.items if item.type == t]) for t in types}

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable summary with the per-item results."""
        return {
            "overall": asdict(self.overall),
            "by_type": {t: asdict(aggregate) for t, aggregate in self.by_type().items()},
            "items": [asdict(item) for item in self.items],
        }


def _aggregate(items: Sequence[ItemExtraction]) -> TypeExtraction:
    if not items:
        return TypeExtraction(n_items=0, exact_rate=0.0, similarity=0.0)
    exact = sum(item.exact for item in items) / len(items)
    similarity = sum(item.similarity for item in items) / len(items)
    return TypeExtraction(n_items=len(items), exact_rate=exact, similarity=similarity)


def greedy_decode(
    model: Any,
    prefixes: Sequence[Int[Tensor, " prefix_pos"]],
    max_new_tokens: int | Sequence[int],
    *,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
    batch_size: int = 32,
    eos_token_id: int | None = None,
    use_kv_cache: bool = True,
) -> list[Int[Tensor, " new_pos"]]:
    """Continue each prefix by argmax decoding under ``fwd_hooks``.

    Prefixes are batched by length and left-padded, with an attention mask, so every row
    attends only to its own tokens, at the positions they would have alone. A row stops at its
    ``max_new_tokens`` or at ``eos_token_id``. The EOS token and anything after it are dropped.

    With ``use_kv_cache`` and a model whose KV cache passes ``kv_cache_supported``, each step
    after the first runs only the new token against the cached keys and values, so hooks see
    ``[batch, 1, ...]`` activations for the new position from the second step on. Hooks that
    treat positions differently need ``use_kv_cache=False``. Without a cache every step
    re-runs the unfinished rows' whole sequences, and hooks see all their positions.

    Args:
        prefixes: Token ids to continue, each of shape ``[prefix_pos]`` with at least one token.
        max_new_tokens: Number of tokens to generate, one for all prefixes or one per prefix.

    Returns:
        The generated tokens of each prefix, in input order, without the prefix.
    """
    limits = _per_prefix_limits(prefixes, max_new_tokens)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    cache_mode = _kv_cache_mode(model) if use_kv_cache else None

    # Similar lengths in one batch keep the padding short.
    order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]), reverse=True)
    outputs: list[Tensor | None] = [None] * len(prefixes)
    pad_id = _pad_id(model)

    renamed = _cache_kwarg_renamed(model) if cache_mode == "renamed" else nullcontext()
    with torch.no_grad(), renamed, attached(model, list(fwd_hooks)):
        for first in range(0, len(order), batch_size):
            indices = order[first : first + batch_size]
            generated = _decode_batch(
                model,
                [prefixes[i] for i in indices],
                [limits[i] for i in indices],
                pad_id=pad_id,
                eos_token_id=eos_token_id,
                use_kv_cache=cache_mode is not None,
            )
            for index, tokens in zip(indices, generated, strict=True):
                outputs[index] = tokens
    return [tokens for tokens in outputs if tokens is not None]


def _per_prefix_limits(
    prefixes: Sequence[Tensor], max_new_tokens: int | Sequence[int]
) -> list[int]:
    for index, prefix in enumerate(prefixes):
        if prefix.ndim != 1 or len(prefix) == 0:
            raise ValueError(
                f"prefix {index} has shape {tuple(prefix.shape)}; each prefix must be a "
                "non-empty 1-D tensor of token ids (prepend BOS to an empty prompt)"
            )
    if isinstance(max_new_tokens, int):
        limits = [max_new_tokens] * len(prefixes)
    else:
        limits = [int(limit) for limit in max_new_tokens]
        if len(limits) != len(prefixes):
            raise ValueError(
                f"max_new_tokens has {len(limits)} entries for {len(prefixes)} prefixes; "
                "pass one int or one per prefix"
            )
    negative = [limit for limit in limits if limit < 0]
    if negative:
        raise ValueError(f"max_new_tokens must be >= 0, got {negative[0]}")
    return limits


def _pad_id(model: Any) -> int:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return 0
    try:
        return pad_token_id(tokenizer)
    except ValueError:
        return 0


def _model_device(model: Any) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _left_pad(
    prefixes: Sequence[Tensor], pad_id: int, device: torch.device
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    length = max(len(prefix) for prefix in prefixes)
    input_ids = torch.full((len(prefixes), length), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(prefixes), length), dtype=torch.long, device=device)
    for row, prefix in enumerate(prefixes):
        input_ids[row, length - len(prefix) :] = prefix.to(device)
        attention_mask[row, length - len(prefix) :] = 1
    return input_ids, attention_mask


def _decode_batch(
    model: Any,
    prefixes: Sequence[Tensor],
    limits: Sequence[int],
    *,
    pad_id: int,
    eos_token_id: int | None,
    use_kv_cache: bool,
) -> list[Tensor]:
    device = _model_device(model)
    input_ids, attention_mask = _left_pad(prefixes, pad_id, device)
    prompt_length = input_ids.shape[1]
    rows = len(prefixes)
    limit = torch.tensor(limits, device=device)
    finished = limit == 0
    cache = None

    for step in range(max(limits, default=0)):
        if bool(finished.all()):
            break

        if use_kv_cache:
            step_ids = input_ids if cache is None else input_ids[:, -1:]
            logits, cache = _forward_cached(model, step_ids, attention_mask, cache)
            next_token = logits[:, -1].argmax(dim=-1)
        else:
            # Without a cache every step re-runs the sequence, so finished rows are left out.
            active = (~finished).nonzero().squeeze(1)
            active_ids, active_mask = _drop_shared_padding(
                input_ids[active], attention_mask[active]
            )
            logits = model(active_ids, attention_mask=active_mask, return_type="logits")
            next_token = torch.full((rows,), pad_id, dtype=torch.long, device=device)
            next_token[active] = logits[:, -1].argmax(dim=-1)

        # Finished rows get padding so the batch stays rectangular, and _trim cuts it off.
        next_token = torch.where(finished, torch.full_like(next_token, pad_id), next_token)
        if eos_token_id is not None:
            finished = finished | (next_token == eos_token_id)
        finished = finished | (limit <= step + 1)

        input_ids = torch.cat([input_ids, next_token[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)[:, None]], dim=1)

    new_tokens = input_ids[:, prompt_length:]
    return [_trim(new_tokens[row], limits[row], eos_token_id) for row in range(rows)]


def _drop_shared_padding(
    input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"]
) -> tuple[Int[Tensor, "batch short_pos"], Int[Tensor, "batch short_pos"]]:
    """Remove the leading columns that are padding in every row.

    Positions are derived from the mask, so removing shared padding changes no real
    token's position.
    """
    real_columns = attention_mask.bool().any(dim=0).nonzero()
    first = int(real_columns[0, 0]) if len(real_columns) else 0
    return input_ids[:, first:], attention_mask[:, first:]


def _trim(tokens: Tensor, limit: int, eos_token_id: int | None) -> Tensor:
    tokens = tokens[:limit]
    if eos_token_id is not None:
        hits = (tokens == eos_token_id).nonzero()
        if len(hits):
            tokens = tokens[: int(hits[0, 0])]
    return tokens.cpu()


def _forward_cached(
    model: Any, input_ids: Tensor, attention_mask: Tensor, cache: Any
) -> tuple[Tensor, Any]:
    """Run one decoding step with the Hugging Face KV cache. Returns logits and the cache.

    The bridge derives each row's positions from ``attention_mask``, which spans the cached
    tokens too, so left padding does not shift the positions of real tokens.
    """
    if cache is None:
        return model(
            input_ids, attention_mask=attention_mask, use_cache=True, return_type="logits_and_cache"
        )
    with warnings.catch_warnings():
        # The bridge hands the cache to transformers 5 under its deprecated name.
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        return model(
            input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            return_type="logits_and_cache",
        )


def kv_cache_supported(model: Any) -> bool:
    """Return whether ``greedy_decode`` can decode ``model`` with a KV cache.

    Only a Hugging Face-backed ``TransformerBridge`` returns a KV cache. It is used only if
    cached decoding reproduces the uncached logits, which is checked once per model on a
    six-token input.
    """
    return _kv_cache_mode(model) is not None


def _kv_cache_mode(model: Any) -> str | None:
    """Return ``"direct"``, ``"renamed"`` (needs ``_cache_kwarg_renamed``) or None."""
    if not isinstance(model, TransformerBridge):
        return None
    modes = _KV_CACHE_MODE.setdefault(model, {})
    fused = is_fused(model)
    if fused in modes:
        return modes[fused]

    mode = None
    match = _cached_logits_match(model)
    if match:
        mode = "direct"
    elif match is not None:
        with _cache_kwarg_renamed(model):
            if _cached_logits_match(model):
                mode = "renamed"
        if mode is None:
            logger.info(
                "%s returns different logits with a KV cache, so decoding runs without one",
                model_id(model),
            )
    modes[fused] = mode
    return mode


def _cached_logits_match(model: Any) -> bool | None:
    """Compare the last logits of a six-token input with and without a KV cache.

    Returns None when the model returns no cache.
    """
    device = _model_device(model)
    tokens = (torch.arange(1, 7, device=device) % int(model.cfg.d_vocab))[None]
    mask = torch.ones_like(tokens)
    with torch.no_grad():
        full = model(tokens, attention_mask=mask, return_type="logits")[:, -1]
        _, cache = _forward_cached(model, tokens[:, :-1], mask[:, :-1], None)
        if cache is None:
            return None
        step, _ = _forward_cached(model, tokens[:, -1:], mask, cache)
    tolerance = 1e-3 * float(full.abs().max()) + 1e-4
    return bool((step[:, -1] - full).abs().max() <= tolerance)


@contextmanager
def _cache_kwarg_renamed(model: Any) -> Iterator[None]:
    """Hand each attention component the KV cache under the name it reads.

    NOTE: transformers 5.x passes the cache to attention modules as ``cache=`` (the old name
    ``past_key_values`` is deprecated), but the attention bridges of transformer-lens 4.3.0
    read only ``past_key_values=``. Without this renaming cached steps attend to the new
    token alone, so decoding ignores the prompt; this also breaks
    ``TransformerBridge.generate()`` with its default ``use_past_kv_cache=True``.
    """

    def rename(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if "cache" not in kwargs or "past_key_values" in kwargs:
            return None
        return args, {**kwargs, "past_key_values": kwargs["cache"]}

    handles = [
        block.attn.register_forward_pre_hook(rename, with_kwargs=True)
        for block in getattr(model, "blocks", [])
        if isinstance(getattr(block, "attn", None), torch.nn.Module)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def extraction_scores(
    model: Any,
    items: Sequence[PIIItem],
    *,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
    batch_size: int = 32,
) -> ExtractionResult:
    """Greedily decode as many tokens as each item's PII has and compare the strings.

    Decoding stops early at the tokenizer's EOS token. An item is exact when the decoded
    string equals the decoded target tokens after stripping surrounding whitespace.
    """
    tokenizer = _tokenizer(model)
    generated = greedy_decode(
        model,
        [item.prefix_ids for item in items],
        [len(item.target_ids) for item in items],
        fwd_hooks=fwd_hooks,
        batch_size=batch_size,
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
    )

    return ExtractionResult(
        items=[
            score_decoded(tokenizer, item, tokens)
            for item, tokens in zip(items, generated, strict=True)
        ]
    )


def score_decoded(tokenizer: Any, item: PIIItem, tokens: Int[Tensor, " new_pos"]) -> ItemExtraction:
    """Compare the greedy ``tokens`` decoded for ``item`` with its PII, as strings.

    Both token lists are decoded and stripped of surrounding whitespace. The item is exact
    when the strings are equal, so a different tokenization of the same string counts.
    """
    target = _decode(tokenizer, item.target_ids)
    decoded = _decode(tokenizer, tokens)
    return ItemExtraction(
        record_index=item.record_index,
        span_index=item.span_index,
        type=item.type,
        target=target,
        decoded=decoded,
        exact=decoded == target,
        similarity=difflib.SequenceMatcher(None, decoded, target).ratio(),
    )


def _tokenizer(model: Any) -> Any:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"{type(model).__name__} has no tokenizer, which extraction_scores needs to "
            "decode tokens; pass tokenizer= when booting the model"
        )
    return tokenizer


def _decode(tokenizer: Any, tokens: Tensor) -> str:
    text = tokenizer.decode(tokens.tolist(), clean_up_tokenization_spaces=False)
    return text.strip()


def exact_match_teacher_forced(
    model: Any,
    items: Sequence[PIIItem],
    *,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
    batch_size: int = 32,
) -> Bool[Tensor, " items"]:
    """Decide for each item whether greedy decoding from its prefix reproduces its target tokens.

    One forward pass over ``prefix + target`` per batch: the item is an exact match when the
    argmax at every target position equals the target token. This equals token-level exact
    match of ``greedy_decode`` (up to ties between logits) at a fraction of the cost, and
    ignores EOS, which cannot be a target token of a PII string.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for index, item in enumerate(items):
        if len(item.prefix_ids) == 0 or len(item.target_ids) == 0:
            raise ValueError(
                f"item {index} has {len(item.prefix_ids)} prefix and {len(item.target_ids)} "
                "target tokens; both must be non-empty (prepend BOS to the prefix)"
            )

    device = _model_device(model)
    pad_id = _pad_id(model)
    exact = torch.zeros(len(items), dtype=torch.bool)
    with torch.no_grad(), attached(model, list(fwd_hooks)):
        for first in range(0, len(items), batch_size):
            batch = items[first : first + batch_size]
            exact[first : first + len(batch)] = _teacher_forced_batch(model, batch, pad_id, device)
    return exact


def _teacher_forced_batch(
    model: Any, items: Sequence[PIIItem], pad_id: int, device: torch.device
) -> Tensor:
    sequences = [torch.cat([item.prefix_ids, item.target_ids]) for item in items]
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = sequence
        attention_mask[row, : len(sequence)] = 1

    # Right padding leaves every real token at its unpadded position.
    logits = model(input_ids.to(device), attention_mask=attention_mask.to(device))
    predictions = logits.argmax(dim=-1).cpu()

    exact = torch.zeros(len(items), dtype=torch.bool)
    for row, item in enumerate(items):
        start = len(item.prefix_ids)
        stop = start + len(item.target_ids)
        # The logits at position p predict the token at p + 1.
        predicted = predictions[row, start - 1 : stop - 1]
        exact[row] = bool((predicted == item.target_ids).all())
    return exact
