"""Loading and validating PII records from every supported source."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from tl_privacy.data import InvalidRecordError, PIIRecord, PIISpan, load_records
from tl_privacy.data.records import RECORD_FIELDS

FIXTURES = Path(__file__).parent / "fixtures"

TEXT = "Call Dana Whitfield at (212) 555-0143 or mail dana.whitfield@example.com."
ROWS = [
    {
        "id": "r1",
        "text": TEXT,
        "spans": [
            {"start": 46, "end": 72, "type": "EMAIL", "pii": "dana.whitfield@example.com"},
            {"start": 5, "end": 19, "type": "NAME", "pii": "Dana Whitfield"},
            {"start": 23, "end": 37, "type": "PHONE"},
        ],
        "meta": {"source": "test"},
    },
    {"id": "r2", "text": "No personal data here.", "spans": [], "meta": {"source": "test"}},
]


def fixture_rows() -> list[dict]:
    lines = (FIXTURES / "records.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def as_tuples(records: list[PIIRecord]) -> list[tuple]:
    return [
        (r.record_id, r.text, [(s.start, s.end, s.type) for s in r.spans], r.meta) for r in records
    ]


# --- valid input ----------------------------------------------------------------------------


def test_load_list_of_dicts():
    records = load_records(ROWS)

    assert len(records) == 2
    first = records[0]
    assert first.record_id == "r1"
    assert [span.type for span in first.spans] == ["NAME", "PHONE", "EMAIL"]
    assert first.pii_strings() == ("Dana Whitfield", "(212) 555-0143", "dana.whitfield@example.com")
    assert first.pii_strings(types=["PHONE"]) == ("(212) 555-0143",)
    assert first.meta == {"source": "test"}
    assert records[1].spans == ()


def test_fixture_file_loads():
    records = load_records(FIXTURES / "records.jsonl")

    assert len(records) == 20
    assert len({record.record_id for record in records}) == 20
    for record, row in zip(records, fixture_rows(), strict=True):
        user_spans = sorted((s["start"], s["end"], s["pii"]) for s in row["spans"])
        assert [(s.start, s.end, s.text(record.text)) for s in record.spans] == user_spans
    types = {span.type for record in records for span in record.spans}
    assert types == {"EMAIL", "PHONE", "NAME", "ADDRESS"}


def test_all_file_formats_agree(tmp_path):
    rows = fixture_rows()
    expected = as_tuples(load_records(rows))

    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    as_json = tmp_path / "records.json"
    as_json.write_text(json.dumps(rows), encoding="utf-8")

    flat = [
        {**row, "spans": json.dumps(row["spans"]), "meta": json.dumps(row["meta"])} for row in rows
    ]
    table = datasets.Dataset.from_list(flat)
    csv = tmp_path / "records.csv"
    table.to_csv(str(csv), index=False)
    parquet = tmp_path / "records.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))

    for source in (jsonl, as_json, csv, parquet, saved, str(jsonl)):
        assert as_tuples(load_records(source)) == expected, source
    assert as_tuples(load_records(datasets.Dataset.from_list(rows))) == expected


def test_lower_case_type_accepted():
    records = load_records(
        [{"text": "Call 555-010-0199", "spans": [{"start": 5, "end": 17, "type": "phone"}]}]
    )

    assert records[0].spans == (PIISpan(5, 17, "PHONE"),)


@pytest.mark.parametrize("given", ["email", "Email", "EMAIL"])
def test_type_case_normalized(given):
    assert PIISpan(0, 4, given).type == "EMAIL"
    assert PIIRecord("a@b.example", (PIISpan(0, 11, given),)).spans[0].type == "EMAIL"


def test_type_case_one_type_across_records(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"text": "Mail a@example.com", "spans": [{"start": 5, "end": 18, "type": "email"}]},
        {"text": "Mail b@example.org", "spans": [{"start": 5, "end": 18, "type": "EMAIL"}]},
        {"text": "Badge 7741-22", "spans": [{"start": 6, "end": 13, "type": "badge_Id"}]},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    records = load_records(path)

    assert {span.type for record in records for span in record.spans} == {"EMAIL", "BADGE_ID"}


def test_pii_strings_type_filter_case():
    record = load_records(ROWS)[0]

    assert record.pii_strings(["email"]) == ("dana.whitfield@example.com",)


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("", "span type is empty"),
        ("first name", "'first name' is not an identifier"),
        ("2FA", "'2FA' is not an identifier"),
        ("e-mail", "'e-mail' is not an identifier"),
        ("stra\u00dfe", "is not an identifier"),
        (7, "span type must be a string"),
    ],
)
def test_invalid_type_rejected(given, problem):
    with pytest.raises(InvalidRecordError, match=problem):
        PIISpan(0, 4, given)
    with pytest.raises(InvalidRecordError, match=problem) as caught:
        load_records(bad_rows(spans=[{"start": 5, "end": 13, "type": given}]))
    assert "record 1 (id 'bad'): span 0" in str(caught.value)


def test_user_type_accepted():
    records = load_records(
        [{"text": "Badge 7741-22", "spans": [{"start": 6, "end": 13, "type": "BADGE_ID"}]}]
    )

    assert records[0].spans[0].type == "BADGE_ID"


def test_records_pass_through():
    record = PIIRecord("Call 555-010-0199", (PIISpan(5, 17, "PHONE"),), "kept")

    assert load_records([record]) == [record]


# --- automatic labels ------------------------------------------------------------------------


def test_auto_label_default_for_unlabelled_source():
    rows = [{"id": "a", "text": "Mail jane.doe@example.com or call (555) 010-0199."}]
    records = load_records(rows)

    assert [(s.type, s.text(records[0].text)) for s in records[0].spans] == [
        ("EMAIL", "jane.doe@example.com"),
        ("PHONE", "(555) 010-0199"),
    ]
    assert load_records(rows, auto_label=False)[0].spans == ()


def test_auto_label_off_for_labelled_source():
    records = load_records(ROWS)

    assert records[1].spans == ()
    assert [s.type for s in records[0].spans] == ["NAME", "PHONE", "EMAIL"]


def test_auto_label_merges_with_user_spans():
    text = "Jane Doe, jane.doe@example.com, +1-555-010-0199"
    rows = [
        {
            "text": text,
            "spans": [
                {"start": 0, "end": 8, "type": "NAME"},
                {"start": 10, "end": 18, "type": "NAME"},
            ],
        }
    ]
    records = load_records(rows, auto_label=True)

    spans = [(s.type, s.text(text)) for s in records[0].spans]
    assert spans == [("NAME", "Jane Doe"), ("NAME", "jane.doe"), ("PHONE", "+1-555-010-0199")]


# --- invalid input ---------------------------------------------------------------------------


def bad_rows(**changes) -> list[dict]:
    """Two records where the second, id 'bad', carries ``changes``."""
    good = {
        "id": "good",
        "text": "Call Jane Doe today.",
        "spans": [{"start": 5, "end": 13, "type": "NAME"}],
    }
    bad = {**good, "id": "bad", **changes}
    return [good, bad]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"spans": [{"start": 5, "end": 99, "type": "NAME"}]}, "out of range"),
        ({"spans": [{"start": -1, "end": 3, "type": "NAME"}]}, "out of range"),
        ({"spans": [{"start": 8, "end": 8, "type": "NAME"}]}, "end must be greater than start"),
        ({"spans": [{"start": 9, "end": 5, "type": "NAME"}]}, "end must be greater than start"),
        (
            {
                "spans": [
                    {"start": 5, "end": 13, "type": "NAME"},
                    {"start": 10, "end": 19, "type": "NAME"},
                ]
            },
            "overlap",
        ),
        (
            {"spans": [{"start": 5, "end": 13, "type": "NAME", "pii": "Jane Roe"}]},
            r"span 0 \(5, 13, NAME\) covers 8 characters that differ from its 'pii' string of 8",
        ),
        ({"text": ""}, "text is empty"),
        ({"text": "   \n"}, "text is empty"),
        ({"spans": [{"start": 4, "end": 5, "type": "NAME"}]}, "only whitespace"),
        (
            {"spans": [{"start": 5, "end": 13, "type": "NAME", "label": "x"}]},
            "unknown field.*'label'.*start, end, type, pii",
        ),
        ({"spans": [{"start": 5, "end": 13}]}, "missing type"),
        ({"spans": [{"start": 5, "end": 13, "type": "first name"}]}, "not an identifier"),
        ({"spans": [{"start": "5", "end": 13, "type": "NAME"}]}, "must be an int"),
        ({"spans": "not json"}, "not a valid JSON list"),
        ({"meta": [1, 2]}, "'meta' must be an object"),
    ],
)
def test_invalid_record_named(changes, problem):
    with pytest.raises(InvalidRecordError, match=problem) as caught:
        load_records(bad_rows(**changes))

    assert "record 1 (id 'bad')" in str(caught.value)


def test_unknown_record_field_lists_allowed():
    with pytest.raises(InvalidRecordError) as caught:
        load_records(bad_rows(label="PII", source="x"))

    message = str(caught.value)
    assert "record 1 (id 'bad')" in message
    assert "'label', 'source'" in message
    assert ", ".join(RECORD_FIELDS) in message


def test_missing_text_named():
    with pytest.raises(InvalidRecordError, match=r"record 0: the required field 'text'"):
        load_records([{"spans": []}])


def test_invalid_record_in_file_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in bad_rows(text="")), encoding="utf-8")

    with pytest.raises(InvalidRecordError, match=r"record 1 \(id 'bad'\): text is empty"):
        load_records(path)


def test_invalid_csv_spans_named(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(
        'id,text,spans\nx,Call Jane Doe,"[{""start"": 5, ""end"": 40, ""type"": ""NAME""}]"\n'
    )

    with pytest.raises(InvalidRecordError, match=r"record 0 \(id 'x'\): span 0 .*out of range"):
        load_records(path)


def test_missing_file():
    with pytest.raises(InvalidRecordError, match="'/no/such/records.jsonl' not found"):
        load_records("/no/such/records.jsonl")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "records.xlsx"
    path.write_text("x")

    with pytest.raises(InvalidRecordError, match=r"unsupported file extension '\.xlsx'.*\.jsonl"):
        load_records(path)


def test_broken_jsonl_line_named(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n')

    with pytest.raises(InvalidRecordError, match="line 2 is not valid JSON"):
        load_records(path)


def test_json_must_be_list(tmp_path):
    path = tmp_path / "records.json"
    path.write_text('{"text": "one record"}')

    with pytest.raises(InvalidRecordError, match="must contain a JSON list"):
        load_records(path)


def test_unsupported_source_type():
    with pytest.raises(InvalidRecordError, match="cannot load records from a int"):
        load_records(42)


def test_dataset_dict_needs_split():
    dataset_dict = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[1:])})

    with pytest.raises(InvalidRecordError, match=r"splits \['train'\]"):
        load_records(dataset_dict)


def test_direct_construction_validates():
    with pytest.raises(InvalidRecordError, match=r"record \(id 'x'\): span 0 .*out of range"):
        PIIRecord("short", (PIISpan(0, 10, "NAME"),), "x")
    with pytest.raises(InvalidRecordError, match="not an identifier"):
        PIISpan(0, 1, "first name")


def test_span_text_helper():
    span = PIISpan(5, 13, "NAME")

    assert span.text("Call Jane Doe today.") == "Jane Doe"


# --- no PII in error messages ---------------------------------------------------------------

SECRET_NAME = "Jane Doe"
SECRET_EMAIL = "jane.doe@example.com"
SECRET_TEXT = f"Call {SECRET_NAME} or mail {SECRET_EMAIL} today."

# Records whose errors concern a span, each with the PII values the message must not contain.
LEAKY_ROWS = {
    "pii differs from the span": (
        {
            "text": SECRET_TEXT,
            "spans": [{"start": 5, "end": 13, "type": "NAME", "pii": "Jane Roe"}],
        },
        ("Jane Doe", "Jane Roe"),
    ),
    "pii string with other offsets": (
        {
            "text": SECRET_TEXT,
            "spans": [{"start": 22, "end": 30, "type": "EMAIL", "pii": SECRET_EMAIL}],
        },
        (SECRET_EMAIL, SECRET_TEXT[22:30]),
    ),
    "span covers only whitespace": (
        {
            "text": f"{SECRET_NAME}   {SECRET_EMAIL}",
            "spans": [{"start": 8, "end": 11, "type": "NAME"}],
        },
        (SECRET_NAME, SECRET_EMAIL),
    ),
    "span is a string": ({"text": SECRET_TEXT, "spans": [SECRET_EMAIL]}, (SECRET_EMAIL,)),
    "start is a string": (
        {"text": SECRET_TEXT, "spans": [{"start": SECRET_NAME, "end": 13, "type": "NAME"}]},
        (SECRET_NAME,),
    ),
    "overlapping spans": (
        {
            "text": SECRET_TEXT,
            "spans": [
                {"start": 5, "end": 13, "type": "NAME", "pii": SECRET_NAME},
                {"start": 10, "end": 40, "type": "EMAIL"},
            ],
        },
        (SECRET_NAME, SECRET_TEXT[10:40]),
    ),
    "span out of range": (
        {"text": SECRET_TEXT, "spans": [{"start": 22, "end": 99, "type": "EMAIL"}]},
        (SECRET_TEXT[22:],),
    ),
    "pii is not a string": (
        {"text": SECRET_TEXT, "spans": [{"start": 5, "end": 13, "type": "NAME", "pii": 5550143}]},
        ("5550143", SECRET_NAME),
    ),
}


@pytest.mark.parametrize("case", list(LEAKY_ROWS))
def test_error_message_hides_pii(case, tmp_path):
    row, secrets = LEAKY_ROWS[case]
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"id": "r7", **row}) + "\n", encoding="utf-8")

    for source in ([row], path):
        with pytest.raises(InvalidRecordError) as caught:
            load_records(source)
        message = str(caught.value)
        assert message.startswith("record 0"), message
        for secret in secrets:
            assert secret not in message, f"{case}: message contains {secret!r}: {message}"


def test_direct_construction_hides_pii():
    with pytest.raises(InvalidRecordError) as caught:
        PIIRecord(f"{SECRET_NAME}   x", (PIISpan(8, 11, "NAME"), PIISpan(0, 8, "NAME")))
    message = str(caught.value)
    assert "span 0 (8, 11, NAME) covers only whitespace" in message
    assert SECRET_NAME not in message


@pytest.mark.parametrize(
    ("name", "content", "kind"),
    [
        ("bad.csv", 'text\n"Call Jane Roe"\n"a","b","c","Jane Roe"\n', "CSV"),
        ("bad.parquet", "not a parquet file: Jane Roe", "Parquet"),
    ],
)
def test_unreadable_table_file_rejected(tmp_path, name, content, kind):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")

    with pytest.raises(InvalidRecordError, match=f"could not be read as a {kind} file") as caught:
        load_records(path)

    assert "Jane Roe" not in str(caught.value)
    assert name in str(caught.value)


def test_jsonl_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    row = {"text": "Mail ann@example.com", "spans": [{"start": 5, "end": 20, "type": "EMAIL"}]}
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(row) + "\n").encode("utf-8"))

    (record,) = load_records(path)

    assert record.text == "Mail ann@example.com"
    assert record.spans[0].text(record.text) == "ann@example.com"
