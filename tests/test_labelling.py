"""Automatic e-mail and phone labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from tl_privacy.data import find_emails, find_phone_numbers, label_pii, load_records

FIXTURES = Path(__file__).parent / "fixtures"


def found(text: str) -> list[tuple[str, str]]:
    return [(span.type, span.text(text)) for span in label_pii(text)]


@pytest.mark.parametrize(
    "phone",
    [
        "(555) 010-0199",
        "+1-555-010-0199",
        "555.010.0199",
        "555-010-0199",
        "(212) 555-0142",
        "+1-617-555-0148",
        "801.555.0161",
        "614-555-0179",
    ],
)
def test_fictional_phone_found_whole(phone):
    text = f"Call {phone} today."

    assert found(text) == [("PHONE", phone)]


def test_phone_span_includes_bracket_and_plus():
    text = "Desk (555) 010-0199, mobile +1-555-010-0199."
    spans = find_phone_numbers(text)

    assert [text[span.start] for span in spans] == ["(", "+"]
    assert [span.start for span in spans] == [text.index("("), text.index("+")]


@pytest.mark.parametrize(
    ("text", "email"),
    [
        ("Reach me at jane.doe@example.com.", "jane.doe@example.com"),
        ("Write to <a.b+tag@mail.example.org>, thanks", "a.b+tag@mail.example.org"),
        ("flast@example.net", "flast@example.net"),
        ("first_last@example.com; next", "first_last@example.com"),
        ("Is it o'brien-smith@example.co.uk?", "o'brien-smith@example.co.uk"),
    ],
)
def test_email_found_exactly(text, email):
    assert found(text) == [("EMAIL", email)]


@pytest.mark.parametrize(
    "text",
    [
        "user@localhost has no top-level domain",
        "@example.com alone",
        "name@ and nothing",
        "a..b@example.com",
        "Version 2.0.1 shipped",
    ],
)
def test_non_emails_rejected(text):
    assert find_emails(text) == []


@pytest.mark.parametrize(
    "text",
    [
        "Meeting on 2023-01-05 at 12:30.",
        "Order 4821 shipped to 1234 Oak Street, Springfield, IL 62704.",
        "Zip 62704-1234 and ISBN 978-3-16-148410-0.",
        "Pi is 3.14159265 and the total is $1,250.00.",
        "Subject: Campaign results #8991",
    ],
)
def test_no_false_positives(text):
    assert label_pii(text) == []


def test_digits_inside_email_not_phone():
    text = "Mail john5550100199@example.com now."

    assert found(text) == [("EMAIL", "john5550100199@example.com")]


def test_spans_sorted_by_start():
    text = "Call 555-010-0199 or mail jane.doe@example.com or call (555) 010-0188."
    spans = label_pii(text)

    assert [span.type for span in spans] == ["PHONE", "EMAIL", "PHONE"]
    assert [span.start for span in spans] == sorted(span.start for span in spans)


def test_fixture_labels_match_user_spans():
    for record in load_records(FIXTURES / "records.jsonl"):
        automatic = [(s.start, s.end, s.type) for s in label_pii(record.text)]
        user_spans = [
            (s.start, s.end, s.type) for s in record.spans if s.type in ("EMAIL", "PHONE")
        ]
        assert automatic == user_spans, record.record_id
