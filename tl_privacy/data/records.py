"""PII records: a text with character spans that mark its personal data, and their loader.

A record is the unit the rest of the library works on. Its text is tokenized as given, and its
spans mark which characters are PII. Spans use code-point indices into the text (Python string
indices), with an exclusive end.
"""

from __future__ import annotations

import itertools
import json
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PII_TYPES: tuple[str, ...] = ("EMAIL", "PHONE", "NAME", "ADDRESS")

RECORD_FIELDS: tuple[str, ...] = ("text", "spans", "id", "meta")
SPAN_FIELDS: tuple[str, ...] = ("start", "end", "type", "pii")
FILE_EXTENSIONS: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet")

# A PII type is an ASCII identifier. It is matched before upper-casing, because str.upper
# turns some non-ASCII letters into ASCII ones ("ß" becomes "SS").
_TYPE_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class InvalidRecordError(ValueError):
    """A record, or the file or data set that contains it, that cannot be used."""


@dataclass(frozen=True)
class PIISpan:
    """One PII occurrence: characters ``[start, end)`` of a record's text and its PII type.

    ``type`` is one of ``PII_TYPES`` or a user-defined identifier such as ``"SSN"``. It is
    stored upper-cased, so ``"email"`` and ``"EMAIL"`` are the same type.
    """

    start: int
    end: int
    type: str

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRecordError(
                    f"span {name} must be an int code-point index, got {_describe(value)}"
                )
        object.__setattr__(self, "type", normalize_type(self.type))

    def text(self, record_text: str) -> str:
        """Return the characters of ``record_text`` that this span covers."""
        return record_text[self.start : self.end]


@dataclass(frozen=True)
class PIIRecord:
    """A text and the spans that mark its PII.

    Construction validates the text and spans (see ``find_record_problem``) and stores
    ``spans`` as a tuple.
    ``meta`` is free-form metadata that is carried along and never interpreted by tokenization.
    """

    text: str
    spans: tuple[PIISpan, ...] = ()
    record_id: str | None = None
    meta: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spans", tuple(self.spans))
        where = "record" if self.record_id is None else f"record (id {self.record_id!r})"
        problem = find_record_problem(self.text, self.spans)
        if problem is not None:
            raise InvalidRecordError(f"{where}: {problem}")

    def pii_strings(self, types: Iterable[str] | None = None) -> tuple[str, ...]:
        """Return the text of each span, in span order, optionally only for the given types.

        A string that occurs in several spans is returned once per span.
        """
        selected_types = None if types is None else {normalize_type(t) for t in types}
        return tuple(
            span.text(self.text)
            for span in self.spans
            if selected_types is None or span.type in selected_types
        )


def normalize_type(pii_type: Any) -> str:
    """Return ``pii_type`` upper-cased; raise ``InvalidRecordError`` unless it is an identifier.

    An identifier is an ASCII letter followed by ASCII letters, digits or underscores.
    """
    if not isinstance(pii_type, str):
        raise InvalidRecordError(
            f"span type must be a string such as 'EMAIL', got {type(pii_type).__name__}"
        )
    if not pii_type:
        raise InvalidRecordError(
            f"span type is empty: use one of {', '.join(PII_TYPES)} or an identifier such as 'SSN'"
        )
    if not _TYPE_PATTERN.fullmatch(pii_type):
        raise InvalidRecordError(
            f"span type {pii_type!r} is not an identifier: use one of {', '.join(PII_TYPES)} "
            "or a name of ASCII letters, digits and underscores that starts with a letter, "
            "such as 'SSN' (lower case is upper-cased)"
        )
    return pii_type.upper()


def type_tuple(value: Any, name: str) -> tuple[str, ...]:
    """Return ``value`` (a sequence of PII type names) as a tuple; raise ValueError for a
    single string, which ``tuple()`` would split into letters. ``name`` is the argument's
    name for the message."""
    if isinstance(value, str):
        raise ValueError(
            f"{name} must be a tuple of type names, got the string {value!r}; "
            f"write ({value!r},) for one type."
        )
    return tuple(value)


def find_record_problem(text: Any, spans: Sequence[PIISpan]) -> str | None:
    """Return a sentence describing what is wrong with a record's text and spans, or None.

    The sentence names spans by index, offsets and type and never quotes their text, which is
    PII.
    """
    if not isinstance(text, str):
        return f"text must be a string, got {type(text).__name__}"
    if not text.strip():
        return "text is empty; every record needs a non-empty 'text'"

    for index, span in enumerate(spans):
        label = f"span {index} ({span.start}, {span.end}, {span.type})"
        if span.end <= span.start:
            return f"{label} is empty or reversed: end must be greater than start"
        if span.start < 0 or span.end > len(text):
            return f"{label} is out of range for a text of {len(text)} characters"
        if not span.text(text).strip():
            return f"{label} covers only whitespace"

    ordered = sorted(range(len(spans)), key=lambda i: (spans[i].start, spans[i].end))
    for previous, current in itertools.pairwise(ordered):
        if spans[current].start < spans[previous].end:
            return (
                f"spans {previous} ({spans[previous].start}, {spans[previous].end}) and "
                f"{current} ({spans[current].start}, {spans[current].end}) overlap; "
                "spans must be disjoint"
            )
    return None


def load_records(
    source: Any,
    *,
    auto_label: bool | None = None,
) -> list[PIIRecord]:
    """Load PII records from a data set, a file or a list of dicts.

    ``source`` is a ``datasets.Dataset``, a path to a ``.jsonl``, ``.json`` (a list of objects),
    ``.csv`` or ``.parquet`` file, a folder written by ``Dataset.save_to_disk``, or a list of
    dicts (``PIIRecord`` objects in the list are kept as they are). Each record has the
    fields ``text`` (required), ``spans`` (a list of ``{start, end, type[, pii]}``; in CSV a
    JSON string), ``id`` and ``meta``. When a span gives ``pii``, it must equal the text the
    span covers. Span types are upper-cased (``"email"`` becomes ``"EMAIL"``). Spans come back
    sorted by start.

    ``auto_label`` adds the spans that ``label_pii`` finds (e-mail addresses and phone numbers)
    to every record. Automatic spans that overlap a span from the source are dropped. The
    default, None, labels automatically only when no record in the source has any span, so a
    labelled data set is taken as it is and an unlabelled one still gets labels.

    Raises ``InvalidRecordError`` naming the record (index and id) and the problem. The
    message never contains the text of a span.
    """
    rows = _read_rows(source)
    records = [_record_from_row(row, index) for index, row in enumerate(rows)]

    if auto_label is None:
        auto_label = not any(record.spans for record in records)
    if auto_label:
        records = [add_automatic_labels(record) for record in records]
    return records


def add_automatic_labels(record: PIIRecord) -> PIIRecord:
    """Return ``record`` with the spans that ``label_pii`` finds added to its own spans.

    Automatic spans that overlap one of the record's spans are dropped, so a span that a user
    gave always wins.
    """
    from tl_privacy.data.labelling import label_pii

    automatic = [
        span
        for span in label_pii(record.text)
        if not any(span.start < own.end and own.start < span.end for own in record.spans)
    ]
    spans = sorted([*record.spans, *automatic], key=lambda span: (span.start, span.end))
    return PIIRecord(record.text, tuple(spans), record.record_id, dict(record.meta))


def _read_rows(source: Any) -> list[Mapping[str, Any]]:
    import datasets

    if isinstance(source, datasets.Dataset):
        return list(source)
    if isinstance(source, datasets.DatasetDict):
        raise InvalidRecordError(
            f"got a DatasetDict with splits {sorted(source)}; pass one split, for example "
            "dataset['train'] in Python or the split's folder (--data FOLDER/train) on the "
            "command line"
        )
    if isinstance(source, (str, Path)):
        return _read_path(Path(source))
    if isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        return list(source)
    raise InvalidRecordError(
        f"cannot load records from a {type(source).__name__}; pass a datasets.Dataset, "
        f"a path to a {'/'.join(FILE_EXTENSIONS)} file or saved data set folder, "
        "or a list of dicts"
    )


def _read_path(path: Path) -> list[Mapping[str, Any]]:
    import datasets

    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as error:
            raise InvalidRecordError(
                f"folder {str(path)!r} is not a data set saved with Dataset.save_to_disk: {error}"
            ) from error
        return _read_rows(loaded)

    suffix = path.suffix.lower()
    if suffix not in FILE_EXTENSIONS:
        raise InvalidRecordError(
            f"unsupported file extension {path.suffix!r} for {str(path)!r}; "
            f"use one of {', '.join(FILE_EXTENSIONS)} or a saved data set folder"
        )
    if not path.exists():
        raise InvalidRecordError(f"record file {str(path)!r} not found")

    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)

    # A throwaway cache folder keeps Arrow's conversion files out of the user's datasets cache;
    # keep_in_memory makes the rows outlive the folder.
    # The conversion's own progress bar is turned off, because reading a small file is quick
    # and the bar would break the one-line output of `tl-privacy --quiet`.
    progress_was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="tl_privacy_records_") as cache_dir:
            reader = (
                datasets.Dataset.from_csv if suffix == ".csv" else datasets.Dataset.from_parquet
            )
            return list(reader(str(path), cache_dir=cache_dir, keep_in_memory=True))
    except Exception as error:
        # The parser's message is left out because some quote the row they failed on (PII).
        kind = "CSV" if suffix == ".csv" else "Parquet"
        raise InvalidRecordError(
            f"{str(path)!r} could not be read as a {kind} file ({_error_names(error)}); "
            f"check that it is a valid {kind} file with a 'text' column"
        ) from None
    finally:
        if progress_was_on:
            datasets.enable_progress_bar()


def _error_names(error: BaseException) -> str:
    """Return the class names of ``error`` and of the errors it wraps, outermost first."""
    names = []
    while error is not None and len(names) < 4:
        names.append(type(error).__name__)
        error = error.__cause__ or error.__context__
    return " from ".join(names)


# JSON files are parsed with the standard library, not through Arrow: Arrow would unify the
# `meta` objects of all records into one struct type (adding None for missing keys) and rejects
# fields whose type differs between records.
def _read_jsonl(path: Path) -> list[Mapping[str, Any]]:
    rows = []
    for line_number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise InvalidRecordError(
                f"{str(path)!r} line {line_number} is not valid JSON: {error}; "
                "write one JSON object per line"
            ) from error
    return rows


def _read_text(path: Path) -> str:
    """Return the text of a UTF-8 file; a byte-order mark at the start is dropped."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise InvalidRecordError(
            f"{str(path)!r} is not valid UTF-8 (byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start}); save the file as UTF-8"
        ) from None


def _read_json(path: Path) -> list[Mapping[str, Any]]:
    try:
        rows = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise InvalidRecordError(f"{str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(rows, list):
        raise InvalidRecordError(
            f"{str(path)!r} must contain a JSON list of record objects, "
            f"got a {type(rows).__name__}; write one object per line to a .jsonl file instead"
        )
    return rows


def _record_from_row(row: Any, index: int) -> PIIRecord:
    if isinstance(row, PIIRecord):
        return row
    if not isinstance(row, Mapping):
        raise InvalidRecordError(
            f"record {index}: expected an object with a 'text' field, got {type(row).__name__}"
        )
    record_id = None if row.get("id") is None else str(row["id"])
    where = f"record {index}" if record_id is None else f"record {index} (id {record_id!r})"

    unknown = sorted(set(row) - set(RECORD_FIELDS))
    if unknown:
        raise InvalidRecordError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed fields are {', '.join(RECORD_FIELDS)}"
        )
    text = row.get("text")
    if text is None:
        raise InvalidRecordError(f"{where}: the required field 'text' is missing or null")

    try:
        spans = _parse_spans(row.get("spans"), text)
        meta = _parse_meta(row.get("meta"))
    except InvalidRecordError as error:
        raise InvalidRecordError(f"{where}: {error}") from None

    problem = find_record_problem(text, spans)
    if problem is not None:
        raise InvalidRecordError(f"{where}: {problem}")
    spans.sort(key=lambda span: (span.start, span.end))
    return PIIRecord(text, tuple(spans), record_id, meta)


def _parse_spans(raw: Any, text: Any) -> list[PIISpan]:
    if raw is None:
        return []
    if isinstance(raw, str):
        if not raw.strip():
            return []
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            raise InvalidRecordError(f"'spans' is not a valid JSON list: {error}") from error
    if not isinstance(raw, Sequence):
        raise InvalidRecordError(f"'spans' must be a list of objects, got {type(raw).__name__}")
    return [_parse_span(item, index, text) for index, item in enumerate(raw)]


def _parse_span(item: Any, index: int, text: Any) -> PIISpan:
    if not isinstance(item, Mapping):
        raise InvalidRecordError(
            f"span {index} must be an object with start, end and type, got {_describe(item)}"
        )
    unknown = sorted(set(item) - set(SPAN_FIELDS))
    if unknown:
        raise InvalidRecordError(
            f"span {index} has unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed span fields are {', '.join(SPAN_FIELDS)}"
        )
    missing = [name for name in ("start", "end", "type") if item.get(name) is None]
    if missing:
        raise InvalidRecordError(f"span {index} is missing {', '.join(missing)}")

    try:
        span = PIISpan(item["start"], item["end"], item["type"])
    except InvalidRecordError as error:
        raise InvalidRecordError(f"span {index}: {error}") from None

    expected_pii = item.get("pii")
    if expected_pii is not None and not isinstance(expected_pii, str):
        raise InvalidRecordError(
            f"span {index}: 'pii' must be a string, got {type(expected_pii).__name__}"
        )
    in_range = isinstance(text, str) and 0 <= span.start < span.end <= len(text)
    if expected_pii is not None and in_range and span.text(text) != expected_pii:
        # Lengths, not the strings, because error messages end up in logs.
        raise InvalidRecordError(
            f"span {index} ({span.start}, {span.end}, {span.type}) covers "
            f"{span.end - span.start} characters that differ from its 'pii' string of "
            f"{len(expected_pii)} characters; fix the offsets or the 'pii' string"
        )
    return span


def _parse_meta(raw: Any) -> dict:
    if raw is None:
        return {}
    if isinstance(raw, str):
        if not raw.strip():
            return {}
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            raise InvalidRecordError(f"'meta' is not a valid JSON object: {error}") from error
    if not isinstance(raw, Mapping):
        raise InvalidRecordError(f"'meta' must be an object, got {type(raw).__name__}")
    return dict(raw)


def _describe(value: Any) -> str:
    """Name ``value`` for an error message: numbers as they are, anything else by its type.

    A misplaced string in a span's fields may be PII, so its content is left out.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    return f"a {type(value).__name__}"
