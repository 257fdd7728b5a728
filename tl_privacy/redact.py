"""Redaction of PII in logs, results and reports: each PII string becomes ``[TYPE]``.

A :class:`Redactor` stores the PII strings of the records in use and replaces them wherever
they occur. It also replaces the separate parts of stored names, so a partial "Dana" of
"Dana Whitfield" is caught too. It also replaces any e-mail address and any phone number
of 10 or more digits that it finds by pattern, so PII from outside the records is caught
where it has a recognisable form. Names and street addresses it does not know pass through,
because they have no reliable surface pattern.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

import phonenumbers

from tl_privacy.data.labelling import EMAIL_PATTERN, PHONE_LENIENCY
from tl_privacy.data.records import PIIRecord, PIISpan

# Shorter name parts ("Al", "Li") are too often ordinary words or syllables to replace.
MIN_NAME_PART = 3

# Seven-digit matches are left alone because durations and counts in logs ("1234567 steps",
# "123.4567 s") would read as local phone numbers; every corpus number has 10 digits.
MIN_PHONE_DIGITS = 10


PLACEHOLDER_PATTERN = re.compile(r"\[[A-Z][A-Z0-9_]*\]")


def _mask_characters(text: str) -> str:
    return re.sub(r"\d", "#", re.sub(r"[^\W\d_]", "x", text))


def placeholder(pii_type: str) -> str:
    """Return the placeholder of a PII string of ``pii_type``, e.g. ``[EMAIL]``."""
    return f"[{pii_type}]"


class Redactor:
    """Replaces known PII strings and pattern-matched e-mail addresses and phone numbers.

    Args:
        known: PII string -> PII type.
        enabled: when False, :meth:`redact` returns its input unchanged (``--show-pii``).
        region: region used to read phone numbers without a country code.
    """

    def __init__(
        self, known: Mapping[str, str] | None = None, *, enabled: bool = True, region: str = "US"
    ) -> None:
        self.enabled = enabled
        self.region = region
        self._known: dict[str, str] = {}
        self._name_parts: dict[str, str] = {}
        self._pattern: re.Pattern[str] | None = None
        for value, pii_type in (known or {}).items():
            self.add(value, pii_type)

    @classmethod
    def from_records(cls, records: Iterable[PIIRecord], *, enabled: bool = True) -> Redactor:
        """Build a redactor that stores the text of every span of ``records``."""
        redactor = cls(enabled=enabled)
        redactor.add_records(records)
        return redactor

    def add(self, value: str, pii_type: str) -> None:
        """Register one PII string; NAME strings also register their parts."""
        value = value.strip()
        if not value:
            return
        self._known[value] = pii_type
        if pii_type == "NAME":
            for part in value.split():
                if len(part) >= MIN_NAME_PART:
                    self._name_parts[part] = pii_type
        self._pattern = None

    def add_records(self, records: Iterable[PIIRecord]) -> None:
        """Register the text of every span of ``records``."""
        for record in records:
            for span in record.spans:
                self.add(span.text(record.text), span.type)

    def __len__(self) -> int:
        return len(self._known)

    def redact(self, text: str) -> str:
        """Return ``text`` with known PII, e-mail addresses and phone numbers replaced."""
        if not self.enabled or not text:
            return text
        text = self._replace_known(text)
        text = EMAIL_PATTERN.sub(placeholder("EMAIL"), text)
        return self._replace_phone_numbers(text)

    def redact_generated(self, text: str) -> str:
        """Redact model output at a PII position, where partial or foreign PII is likely.

        Known PII, e-mail addresses and phone numbers become placeholders as in
        :meth:`redact`. Every other letter then becomes ``x`` and every digit ``#``, so a
        partly recalled string shows its shape ("xxxxx.xxxxx@xxxxxxx.") but none of its
        characters.
        """
        if not self.enabled:
            return text
        redacted = self.redact(text)
        pieces = PLACEHOLDER_PATTERN.split(redacted)
        kept = PLACEHOLDER_PATTERN.findall(redacted)
        masked = [_mask_characters(piece) for piece in pieces]
        return "".join(m + k for m, k in zip(masked, [*kept, ""], strict=True))

    def redact_record(self, record: PIIRecord, end: int | None = None) -> str:
        """Return ``record.text[:end]`` with each span replaced by its placeholder.

        Spans are replaced by position, so this is exact for the record's own labels. A span
        cut by ``end`` is replaced whole. The rest then goes through :meth:`redact`.
        """
        text = record.text if end is None else record.text[:end]
        if not self.enabled:
            return text
        pieces, position = [], 0
        for span in sorted(record.spans, key=lambda span: span.start):
            if span.start >= len(text):
                break
            pieces.append(text[position : span.start])
            pieces.append(placeholder(span.type))
            position = min(span.end, len(text))
        pieces.append(text[position:])
        return self.redact("".join(pieces))

    def label_known(self, record: PIIRecord) -> PIIRecord:
        """Return ``record`` with a span added for each known PII string or name part in it.

        Occurrences that overlap one of the record's spans are skipped. This catches PII that
        a record repeats without a label, such as a first name in a greeting.
        """
        pattern = self._compiled()
        if pattern is None:
            return record
        spans = list(record.spans)
        for match in pattern.finditer(record.text):
            if any(match.start() < span.end and span.start < match.end() for span in spans):
                continue
            value = match.group(0)
            spans.append(PIISpan(match.start(), match.end(), self._type_of(value)))
        spans.sort(key=lambda span: (span.start, span.end))
        return PIIRecord(record.text, tuple(spans), record.record_id, dict(record.meta))

    def _type_of(self, value: str) -> str:
        return self._known.get(value) or self._name_parts[value]

    def _replace_known(self, text: str) -> str:
        pattern = self._compiled()
        if pattern is None:
            return text

        def substitute(match: re.Match[str]) -> str:
            return placeholder(self._type_of(match.group(0)))

        return pattern.sub(substitute, text)

    def _compiled(self) -> re.Pattern[str] | None:
        if self._pattern is None and (self._known or self._name_parts):
            # Longer strings first, so a whole name wins over its parts and "ann@x" over "ann".
            values = sorted({*self._known, *self._name_parts}, key=len, reverse=True)
            alternatives = "|".join(re.escape(value) for value in values)
            self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")
        return self._pattern

    def _replace_phone_numbers(self, text: str) -> str:
        matcher = phonenumbers.PhoneNumberMatcher(text, self.region, leniency=PHONE_LENIENCY)
        matches = [m for m in matcher if sum(c.isdigit() for c in m.raw_string) >= MIN_PHONE_DIGITS]
        for match in reversed(matches):
            text = text[: match.start] + placeholder("PHONE") + text[match.end :]
        return text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's formatted message with a :class:`Redactor`.

    Attach it to a handler; the redactor can learn new PII strings after the filter is
    attached (for example once the records are loaded).
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if self.redactor.enabled:
            record.msg = self.redactor.redact(record.getMessage())
            record.args = None
        return True
