"""Tokenization of PII records with token-level PII labels.

Every module that needs PII positions goes through ``tokenize_record``, so a token is PII under
one rule everywhere: it is PII when its character range overlaps a span and its text is not
only whitespace. Byte-level BPE tokenizers give several tokens the same offsets when they
split one character into bytes. Some also include the leading space in a word's offsets. The
overlap rule handles both cases.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_privacy.data.records import PII_TYPES, PIIRecord

PADDING_SIDES = ("left", "right")

# Offsets of a prepended BOS token, which covers no character of the text.
BOS_OFFSETS = (0, 0)


@dataclass(frozen=True)
class TokenizedRecord:
    """A record's token ids with per-token PII labels.

    ``pii_type_ids`` is the index of the token's PII type in the ``type_names`` that
    ``tokenize_record`` was called with, and -1 where ``pii_mask`` is False. ``offsets`` are
    code-point ranges into the record text, one per token, with ``(0, 0)`` for a prepended BOS.
    ``span_token_ranges[j]`` is ``(first, stop)``, the first and one-past-last token index of
    ``record.spans[j]``. The range may contain whitespace-only tokens inside the span, which
    ``pii_mask`` leaves out. It is empty, ``(pos, pos)``, only for a span that ``max_length``
    truncated away entirely.
    """

    input_ids: Int[Tensor, " pos"]
    pii_mask: Bool[Tensor, " pos"]
    pii_type_ids: Int[Tensor, " pos"]
    offsets: list[tuple[int, int]]
    span_token_ranges: list[tuple[int, int]]


@dataclass(frozen=True)
class PIIItem:
    """One PII occurrence cut at its first token, for scoring how well a model recalls it.

    ``prefix_ids`` are the record's tokens before the first token that overlaps the PII (BOS
    included when it was prepended). A token shared between context and PII belongs to the PII,
    so the prefix ends before it. ``target_ids`` are the tokens of the PII as they occur in the
    record, possibly with a leading space merged into the first one.
    """

    record_index: int
    span_index: int
    type: str
    prefix_ids: Int[Tensor, " prefix_pos"]
    target_ids: Int[Tensor, " target_pos"]
    text: str


def tokenize_record(
    tokenizer: Any,
    record: PIIRecord,
    *,
    prepend_bos: bool = True,
    max_length: int | None = None,
    type_names: tuple[str, ...] = PII_TYPES,
) -> TokenizedRecord:
    """Tokenize ``record.text`` as given and label each token that overlaps a PII span.

    The text is encoded without the tokenizer's special tokens. With ``prepend_bos`` the
    tokenizer's ``bos_token_id`` is put in front, unless the encoded text already starts with
    it. ``max_length`` truncates the result, BOS included, to at most that many tokens.

    Raises ValueError when a span's type is not in ``type_names``, when ``prepend_bos`` is set
    and the tokenizer has no BOS token, or when a span cannot be aligned to any token.
    """
    type_index = _type_index(record, type_names)
    ids, offsets = encode_with_offsets(tokenizer, record.text)

    if prepend_bos:
        bos_id = bos_token_id(tokenizer)
        if not ids or ids[0] != bos_id:
            ids = [bos_id, *ids]
            offsets = [BOS_OFFSETS, *offsets]

    pii_mask, pii_type_ids, ranges = _label_tokens(record, offsets, type_index)

    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        ids, offsets = ids[:max_length], offsets[:max_length]
        pii_mask, pii_type_ids = pii_mask[:max_length], pii_type_ids[:max_length]
        ranges = [(min(first, max_length), min(stop, max_length)) for first, stop in ranges]

    return TokenizedRecord(
        input_ids=torch.tensor(ids, dtype=torch.long),
        pii_mask=torch.tensor(pii_mask, dtype=torch.bool),
        pii_type_ids=torch.tensor(pii_type_ids, dtype=torch.long),
        offsets=offsets,
        span_token_ranges=ranges,
    )


def _type_index(record: PIIRecord, type_names: Sequence[str]) -> dict[str, int]:
    index = {name: position for position, name in enumerate(type_names)}
    for span in record.spans:
        if span.type not in index:
            where = "record" if record.record_id is None else f"record {record.record_id!r}"
            raise ValueError(
                f"{where} has a span of type {span.type!r}, which is not in type_names "
                f"{tuple(type_names)}; pass type_names that include it, for example "
                "type_names_for(records)"
            )
    return index


def _label_tokens(
    record: PIIRecord,
    offsets: list[tuple[int, int]],
    type_index: dict[str, int],
) -> tuple[list[bool], list[int], list[tuple[int, int]]]:
    text = record.text
    is_content = [end > start and text[start:end].strip() != "" for start, end in offsets]
    pii_mask = [False] * len(offsets)
    pii_type_ids = [-1] * len(offsets)
    ranges = []

    for span_index, span in enumerate(record.spans):
        covered = [
            position
            for position, (start, end) in enumerate(offsets)
            if is_content[position] and start < span.end and end > span.start
        ]
        if not covered:
            raise ValueError(
                f"span {span_index} ({span.start}, {span.end}, {span.type}) of record "
                f"{record.record_id!r} overlaps no token; "
                "the tokenizer's offsets do not cover these characters "
                "(a normalizer may drop them)"
            )
        ranges.append((covered[0], covered[-1] + 1))

        # A token that overlaps two adjacent spans keeps the type of the first one.
        for position in covered:
            if not pii_mask[position]:
                pii_mask[position] = True
                pii_type_ids[position] = type_index[span.type]
    return pii_mask, pii_type_ids, ranges


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Encode ``text`` without special tokens and return token ids and character offsets.

    Offsets come from the fast tokenizer's offset mapping. For a tokenizer without one, or one
    that reports zero-width offsets for tokens that decode to visible text, they are rebuilt
    with ``offsets_by_decoding``.
    """
    offsets = None
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = [int(token_id) for token_id in encoding["input_ids"]]
        offsets = [(int(start), int(end)) for start, end in encoding["offset_mapping"]]
    else:
        ids = [int(token_id) for token_id in tokenizer(text, add_special_tokens=False)["input_ids"]]

    if offsets is None or _has_zero_width_content(tokenizer, ids, offsets):
        offsets = offsets_by_decoding(tokenizer, ids, text)
    return ids, offsets


def _has_zero_width_content(tokenizer: Any, ids: list[int], offsets: list[tuple[int, int]]) -> bool:
    return any(
        start == end and tokenizer.decode([token_id]).strip() != ""
        for token_id, (start, end) in zip(ids, offsets, strict=False)
    )


def offsets_by_decoding(tokenizer: Any, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Rebuild character offsets by decoding the growing prefixes ``ids[:1]``, ``ids[:2]``, ...

    Token ``i`` ends where the decoded prefix ``ids[:i + 1]`` ends. A token that contains only
    the first bytes of a multi-byte character decodes to U+FFFD, so it gets the offsets of the
    token that completes the character. Costs one decode per token, quadratic in the length.

    Raises ValueError when decoding all tokens does not give back ``text``, because the
    prefix lengths then do not index into it.
    """
    decoded = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    if decoded != text:
        raise ValueError(
            f"cannot align the tokens of {type(tokenizer).__name__} to the text: it gives no "
            f"character offsets and decoding its tokens does not return the text ({len(decoded)} "
            f"characters instead of {len(text)}, texts not shown because they may hold PII); "
            "use a fast (Rust) tokenizer that supports return_offsets_mapping"
        )

    ends = []
    for stop in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:stop], clean_up_tokenization_spaces=False)
        end = len(prefix.rstrip("\ufffd"))
        ends.append(max(end, ends[-1]) if ends else end)

    offsets = [(0 if i == 0 else ends[i - 1], end) for i, end in enumerate(ends)]
    for i in range(len(offsets) - 2, -1, -1):
        start, end = offsets[i]
        if start == end and offsets[i + 1][0] == start:
            offsets[i] = (start, offsets[i + 1][1])
    return offsets


def bos_token_id(tokenizer: Any) -> int:
    """Return the tokenizer's BOS token id, raising ValueError when it has none."""
    token_id = getattr(tokenizer, "bos_token_id", None)
    if token_id is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no bos_token_id, so a BOS token cannot be "
            "prepended; pass prepend_bos=False or set tokenizer.bos_token"
        )
    return int(token_id)


def pad_token_id(tokenizer: Any) -> int:
    """Return the tokenizer's pad token id, falling back to its EOS token id."""
    for name in ("pad_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return int(token_id)
    raise ValueError(
        f"{type(tokenizer).__name__} has neither pad_token_id nor eos_token_id; "
        "set tokenizer.pad_token before batching"
    )


def type_names_for(records: Iterable[PIIRecord]) -> tuple[str, ...]:
    """Return ``PII_TYPES`` followed by the other span types of ``records``, sorted."""
    extra = {span.type for record in records for span in record.spans} - set(PII_TYPES)
    return (*PII_TYPES, *sorted(extra))


def collate(
    items: Sequence[TokenizedRecord],
    pad_token_id: int,
    padding_side: str = "right",
) -> dict[str, Tensor]:
    """Pad tokenized records into one batch.

    Returns ``input_ids`` Long[batch, pos], ``attention_mask`` Long[batch, pos] (1 real, 0 pad),
    ``pii_mask`` Bool[batch, pos] (False at pads) and ``pii_type_ids`` Long[batch, pos]
    (-1 at pads), where pos is the longest item's length.
    """
    if not items:
        raise ValueError("collate needs at least one tokenized record, got an empty list")
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; pass pad_token_id(tokenizer)")

    batch_size = len(items)
    length = max(len(item.input_ids) for item in items)
    input_ids = torch.full((batch_size, length), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    pii_mask = torch.zeros((batch_size, length), dtype=torch.bool)
    pii_type_ids = torch.full((batch_size, length), -1, dtype=torch.long)

    for row, item in enumerate(items):
        size = len(item.input_ids)
        columns = slice(0, size) if padding_side == "right" else slice(length - size, length)
        input_ids[row, columns] = item.input_ids
        attention_mask[row, columns] = 1
        pii_mask[row, columns] = item.pii_mask
        pii_type_ids[row, columns] = item.pii_type_ids

    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pii_mask": pii_mask,
        "pii_type_ids": pii_type_ids,
    }


def make_batches(
    tokenizer: Any,
    records: Sequence[PIIRecord],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    max_length: int | None = None,
    prepend_bos: bool = True,
    padding_side: str = "right",
    type_names: tuple[str, ...] | None = None,
) -> list[dict[str, Tensor]]:
    """Tokenize ``records`` and group them into padded batches (see ``collate``).

    Each batch also has ``record_index`` Long[batch], the position of each row's record in
    ``records``. ``shuffle`` permutes the records with ``random.Random(seed)`` before batching;
    the last batch may be smaller. ``type_names`` defaults to ``type_names_for(records)``, which
    is ``PII_TYPES`` when the records use no other type.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not records:
        raise ValueError("make_batches needs at least one record, got none")
    if type_names is None:
        type_names = type_names_for(records)
    pad_id = pad_token_id(tokenizer)

    order = list(range(len(records)))
    if shuffle:
        random.Random(seed).shuffle(order)

    batches = []
    for first in range(0, len(order), batch_size):
        indices = order[first : first + batch_size]
        tokenized = [
            tokenize_record(
                tokenizer,
                records[index],
                prepend_bos=prepend_bos,
                max_length=max_length,
                type_names=type_names,
            )
            for index in indices
        ]
        batch = collate(tokenized, pad_id, padding_side)
        batch["record_index"] = torch.tensor(indices, dtype=torch.long)
        batches.append(batch)
    return batches


def pii_items(
    tokenizer: Any,
    records: Sequence[PIIRecord],
    *,
    prepend_bos: bool = True,
    types: Iterable[str] | None = None,
    all_occurrences: bool = False,
) -> list[PIIItem]:
    """Cut each PII occurrence of ``records`` into a prefix and a target, in text order.

    By default only the first occurrence of each distinct PII string in a record is kept,
    because a model can copy later repeats from its context, so they do not measure
    memorization. ``all_occurrences=True`` keeps every span. ``types`` keeps only spans of
    those types.
    """
    if isinstance(types, str):
        types = (types,)
    selected_types = None if types is None else set(types)
    type_names = type_names_for(records)

    items = []
    for record_index, record in enumerate(records):
        tokenized = tokenize_record(
            tokenizer, record, prepend_bos=prepend_bos, type_names=type_names
        )
        seen: set[str] = set()
        in_text_order = sorted(range(len(record.spans)), key=lambda j: record.spans[j].start)

        for span_index in in_text_order:
            span = record.spans[span_index]
            pii = span.text(record.text)
            if selected_types is not None and span.type not in selected_types:
                continue
            if not all_occurrences and pii in seen:
                continue
            seen.add(pii)

            first, stop = tokenized.span_token_ranges[span_index]
            items.append(
                PIIItem(
                    record_index=record_index,
                    span_index=span_index,
                    type=span.type,
                    prefix_ids=tokenized.input_ids[:first].clone(),
                    target_ids=tokenized.input_ids[first:stop].clone(),
                    text=pii,
                )
            )
    return items
