"""Automatic PII labels for e-mail addresses and phone numbers.

Names and street addresses have no reliable surface pattern, so they come only from the spans
that a user gives.
"""

from __future__ import annotations

import re

import phonenumbers

from tl_privacy.data.records import PIISpan

# A dot-atom local part (RFC 5322 without quoted strings) and a domain of dot-separated DNS
# labels ending in an alphabetic top-level domain, so a sentence-final period stays outside.
_LOCAL_CHARS = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
EMAIL_PATTERN = re.compile(
    rf"(?<![{_LOCAL_CHARS}.])"
    rf"[{_LOCAL_CHARS}]+(?:\.[{_LOCAL_CHARS}]+)*"
    r"@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,63}"
    r"(?![A-Za-z0-9-])"
)

# POSSIBLE accepts numbers whose digits form a possible length for the region without checking
# that the exchange is assigned, which keeps the fictional 555-01xx numbers that VALID rejects
# (phonenumbers 9.0: "(555) 010-0199" is found only under POSSIBLE).
PHONE_LENIENCY = phonenumbers.Leniency.POSSIBLE


def find_emails(text: str) -> list[PIISpan]:
    """Return an EMAIL span for each e-mail address in ``text``."""
    return [PIISpan(match.start(), match.end(), "EMAIL") for match in EMAIL_PATTERN.finditer(text)]


def find_phone_numbers(text: str, region: str = "US") -> list[PIISpan]:
    """Return a PHONE span for each phone number in ``text``.

    Numbers without a country code are read as numbers of ``region``. A span includes a
    leading "(" or "+" and any extension that phonenumbers reads as part of the number.
    """
    matcher = phonenumbers.PhoneNumberMatcher(text, region, leniency=PHONE_LENIENCY)
    return [PIISpan(match.start, match.end, "PHONE") for match in matcher]


def label_pii(text: str, region: str = "US") -> list[PIISpan]:
    """Find the e-mail addresses and phone numbers in ``text``, sorted by start.

    A phone match that overlaps an e-mail address (digits inside the local part) is dropped.
    """
    emails = find_emails(text)
    phones = [
        phone
        for phone in find_phone_numbers(text, region)
        if not any(phone.start < email.end and email.start < phone.end for email in emails)
    ]
    return sorted([*emails, *phones], key=lambda span: span.start)
