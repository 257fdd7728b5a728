"""A seeded corpus of short corporate e-mails that carry synthetic PII.

Each record is one e-mail from one fictional person. It starts with a unique Subject line, so
the prefix identifies the record. From and To lines, a greeting and a short business body
follow, then a signature with the sender's name, e-mail address, phone number and street
address. Training people and held-out people are disjoint, so a model fine-tuned on
``training_stream()`` has seen the training PII and never the held-out PII.

All PII is synthetic: names and addresses come from Faker, e-mail addresses use only the
reserved domains example.com, example.org and example.net, and phone numbers use only the
exchange and lines 555-0100 to 555-0199, which the North American Numbering Plan reserves for
fiction. Generation uses ``random.Random`` and Faker instances seeded from ``config.seed``
through SHA-256, never Python's salted ``hash()``, so the same seed gives the same corpus in
every process (for a fixed Faker version).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faker import Faker

from tl_privacy.data.records import PIIRecord, PIISpan, load_records

EMAIL_DOMAINS = ("example.com", "example.org", "example.net")
EMAIL_PATTERNS = ("first.last", "flast", "first_last")

# Area codes of large US cities. With the 100 fictional lines per area code this gives
# 2,400 distinct numbers, enough for 1,000 candidates per phone number.
AREA_CODES = (
    "202", "206", "212", "213", "215", "303", "305", "312", "313", "404", "412", "415",
    "503", "512", "602", "612", "614", "617", "702", "713", "720", "801", "813", "919",
)  # fmt: skip
PHONE_EXCHANGE = "555"
PHONE_LINES = tuple(f"{line:04d}" for line in range(100, 200))

MAX_PEOPLE = len(AREA_CODES) * len(PHONE_LINES)
"""People (training and held-out) a corpus can hold: each gets a distinct phone number."""

PHONE_FORMATS = (
    "({area}) {exchange}-{line}",
    "+1-{area}-{exchange}-{line}",
    "{area}.{exchange}.{line}",
    "{area}-{exchange}-{line}",
)

SUPPORTED_LOCALES = ("en_US",)

SUBJECTS = (
    "Q3 budget review", "Vendor contract renewal", "Onboarding checklist",
    "Office move schedule", "Invoice discrepancy", "Quarterly sales figures",
    "Server maintenance window", "Travel reimbursement", "Client workshop agenda",
    "Shipping delay", "Safety training dates", "Draft press release",
    "Hiring plan update", "Purchase order approval", "Campaign results",
    "Inventory count", "Project kickoff", "Audit preparation",
)  # fmt: skip
GREETINGS = ("Hi {name},", "Hello {name},", "Dear {name},", "{name},")
SIGN_OFFS = ("Regards,", "Thanks,", "Best,", "Cheers,")
BODIES = (
    "Could you send the signed copy by {day}?",
    "The totals changed by {percent}% after the audit.",
    "The meeting moved to {day} at {hour} pm.",
    "Please review the attached draft by {day}.",
    "I will follow up on the numbers {day}.",
    "Delivery is now planned for week {week}.",
    "I booked the large room for {day} at {hour} pm.",
    "Finance approved the order this morning.",
)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")


@dataclass(frozen=True)
class SyntheticCorpusConfig:
    """Size and seed of a synthetic corpus.

    ``repeats`` is the number of times each training record occurs in ``training_stream()``
    (the number of fine-tuning epochs). ``emails_per_person`` is the number of distinct
    e-mails, with different subjects and bodies, that each person sends.
    """

    n_people: int = 32
    n_heldout_people: int = 16
    repeats: int = 10
    seed: int = 0
    emails_per_person: int = 1
    locale: str = "en_US"

    def __post_init__(self) -> None:
        for name in ("n_people", "repeats", "emails_per_person"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_heldout_people < 0:
            raise ValueError(f"n_heldout_people must be >= 0, got {self.n_heldout_people}")
        if self.n_people + self.n_heldout_people > MAX_PEOPLE:
            raise ValueError(
                f"n_people + n_heldout_people = {self.n_people + self.n_heldout_people} "
                f"exceeds the {MAX_PEOPLE} distinct fictional phone numbers"
            )
        if self.locale not in SUPPORTED_LOCALES:
            raise ValueError(
                f"locale {self.locale!r} is not supported; use one of {SUPPORTED_LOCALES}, "
                "because phone numbers and addresses are written in US formats"
            )


@dataclass(frozen=True)
class Person:
    """A fictional person and the PII strings that their e-mails contain."""

    name: str
    email: str
    phone: str
    address: str
    first_name: str
    last_name: str


@dataclass
class PIICorpus:
    """Training and held-out e-mail records and the people who sent them.

    ``people`` lists the training people first (``config.n_people`` of them), then the
    held-out people. Each record's ``meta`` contains ``split``, ``person_index`` (into ``people``)
    and ``email_index``.
    """

    train: list[PIIRecord]
    heldout: list[PIIRecord]
    people: list[Person]
    config: SyntheticCorpusConfig

    @property
    def train_people(self) -> list[Person]:
        return self.people[: self.config.n_people]

    @property
    def heldout_people(self) -> list[Person]:
        return self.people[self.config.n_people :]

    def training_stream(self) -> list[PIIRecord]:
        """Return the training records repeated ``config.repeats`` times.

        Each repeat is one epoch: every training record once, in an order shuffled with a
        generator seeded from ``config.seed``.
        """
        rng = random.Random(derive_seed(self.config.seed, "training-stream"))
        stream = []
        for _ in range(self.config.repeats):
            epoch = list(self.train)
            rng.shuffle(epoch)
            stream.extend(epoch)
        return stream

    def to_jsonl(self, path: str | Path) -> None:
        """Write all records to a JSONL file that ``load_records`` and ``from_jsonl`` read.

        Each line is ``{id, text, spans, meta}``. Besides the record's own meta, ``meta`` contains
        the sender under ``person`` and the generation config under ``corpus_config``.
        """
        config = dataclasses.asdict(self.config)
        with Path(path).open("w", encoding="utf-8") as handle:
            for record in [*self.train, *self.heldout]:
                person = self.people[record.meta["person_index"]]
                row = {
                    "id": record.record_id,
                    "text": record.text,
                    "spans": [
                        {"start": s.start, "end": s.end, "type": s.type, "pii": s.text(record.text)}
                        for s in record.spans
                    ],
                    "meta": {
                        **record.meta,
                        "person": dataclasses.asdict(person),
                        "corpus_config": config,
                    },
                }
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    @classmethod
    def from_jsonl(cls, path: str | Path) -> PIICorpus:
        """Read a corpus written by ``to_jsonl``."""
        records = load_records(path, auto_label=False)
        if not records or "corpus_config" not in records[0].meta:
            raise ValueError(
                f"{str(path)!r} is not a corpus file: its records have no 'corpus_config' in "
                "meta; write it with PIICorpus.to_jsonl"
            )
        config = SyntheticCorpusConfig(**records[0].meta["corpus_config"])

        people: dict[int, Person] = {}
        train, heldout = [], []
        for record in records:
            meta = dict(record.meta)
            people[meta["person_index"]] = Person(**meta.pop("person"))
            meta.pop("corpus_config")
            stripped = PIIRecord(record.text, record.spans, record.record_id, meta)
            (train if meta["split"] == "train" else heldout).append(stripped)

        ordered_people = [people[index] for index in sorted(people)]
        return cls(train=train, heldout=heldout, people=ordered_people, config=config)


def derive_seed(seed: int, purpose: str) -> int:
    """Derive a 64-bit seed for one use of randomness from the corpus seed, stable across runs."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def generate_corpus(config: SyntheticCorpusConfig | None = None) -> PIICorpus:
    """Generate the people and e-mail records described by ``config``."""
    config = config or SyntheticCorpusConfig()
    rng = random.Random(derive_seed(config.seed, "people"))
    faker = _seeded_faker(config.locale, derive_seed(config.seed, "faker"))

    people = _make_people(config.n_people + config.n_heldout_people, rng, faker)
    record_count = len(people) * config.emails_per_person
    references = rng.sample(range(1_000, 10_000), record_count)
    sender_names = {person.name for person in people}

    train, heldout = [], []
    for person_index, person in enumerate(people):
        split = "train" if person_index < config.n_people else "heldout"
        for email_index in range(config.emails_per_person):
            reference = references[person_index * config.emails_per_person + email_index]
            recipient = _unique_name(faker, sender_names)
            record = _make_email(person, recipient, reference, rng, faker)
            meta = {"split": split, "person_index": person_index, "email_index": email_index}
            record_id = f"{split}-{person_index:03d}-{email_index}"
            record = PIIRecord(record.text, record.spans, record_id, meta)
            (train if split == "train" else heldout).append(record)

    return PIICorpus(train=train, heldout=heldout, people=people, config=config)


def _seeded_faker(locale: str, seed: int) -> Faker:
    faker = Faker(locale)
    faker.seed_instance(seed)
    return faker


def _make_people(count: int, rng: random.Random, faker: Faker) -> list[Person]:
    numbers = rng.sample([(area, line) for area in AREA_CODES for line in PHONE_LINES], count)
    people: list[Person] = []
    names: set[str] = set()
    emails: set[str] = set()
    addresses: set[str] = set()

    for area, line in numbers:
        while True:
            first, last = faker.first_name(), faker.last_name()
            pattern, domain = rng.choice(EMAIL_PATTERNS), rng.choice(EMAIL_DOMAINS)
            email = f"{_email_local_part(first, last, pattern)}@{domain}"
            address = _fake_address(faker)
            if f"{first} {last}" not in names and email not in emails and address not in addresses:
                break

        phone = rng.choice(PHONE_FORMATS).format(area=area, exchange=PHONE_EXCHANGE, line=line)
        person = Person(f"{first} {last}", email, phone, address, first, last)
        people.append(person)
        names.add(person.name)
        emails.add(email)
        addresses.add(address)
    return people


def _email_local_part(first: str, last: str, pattern: str) -> str:
    first, last = _ascii_lower(first), _ascii_lower(last)
    if pattern == "first.last":
        return f"{first}.{last}"
    if pattern == "first_last":
        return f"{first}_{last}"
    if pattern == "flast":
        return f"{first[0]}{last}"
    raise ValueError(f"unknown e-mail pattern {pattern!r}; use one of {EMAIL_PATTERNS}")


def _ascii_lower(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def _fake_address(faker: Faker) -> str:
    # int() drops the leading zeros that Faker's building numbers can have ("0487").
    building = int(faker.building_number())
    state = faker.state_abbr(include_territories=False, include_freely_associated_states=False)
    return f"{building} {faker.street_name()}, {faker.city()}, {state} {faker.zipcode()}"


def _unique_name(faker: Faker, excluded_names: set[str]) -> str:
    while True:
        name = f"{faker.first_name()} {faker.last_name()}"
        if name not in excluded_names:
            return name


class _TextBuilder:
    """Concatenates text pieces and records the span of each piece that is PII."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.spans: list[PIISpan] = []

    def add(self, piece: str, pii_type: str | None = None) -> None:
        if pii_type is not None:
            self.spans.append(PIISpan(self.length, self.length + len(piece), pii_type))
        self.parts.append(piece)
        self.length += len(piece)

    def build(self) -> PIIRecord:
        return PIIRecord("".join(self.parts), tuple(self.spans))


def _make_email(
    sender: Person, recipient: str, reference: int, rng: random.Random, faker: Faker
) -> PIIRecord:
    """Write one e-mail from ``sender``. The recipient's full name in the To line is a NAME span.

    The greeting repeats the recipient's first name without a span, because the model can copy
    it from the To line, so it measures no memorization.
    """
    body = rng.choice(BODIES).format(
        day=rng.choice(WEEKDAYS),
        percent=rng.randint(2, 19),
        hour=rng.randint(1, 5),
        week=rng.randint(2, 50),
    )
    text = _TextBuilder()
    text.add(f"Subject: {rng.choice(SUBJECTS)} #{reference}\nFrom: ")
    text.add(sender.name, "NAME")
    text.add("\nTo: ")
    text.add(recipient, "NAME")
    text.add("\n\n" + rng.choice(GREETINGS).format(name=recipient.split()[0]))
    text.add(f"\n{body}\n\n{rng.choice(SIGN_OFFS)}\n")
    text.add(sender.name, "NAME")
    text.add("\n")
    text.add(sender.email, "EMAIL")
    text.add(" | ")
    text.add(sender.phone, "PHONE")
    text.add("\n")
    text.add(sender.address, "ADDRESS")
    return text.build()


def candidates_for(
    item_text: str,
    type: str,
    n: int,
    rng: random.Random,
    locale: str = "en_US",
) -> list[str]:
    """Return ``n`` distinct strings of the same format as the PII string ``item_text``.

    The candidates stand in for the true string when ranking it among alternatives (exposure,
    mean reciprocal rank), so ``item_text`` is never among them. Formats per type:

    - PHONE: the same punctuation and exchange, with other area codes from ``AREA_CODES`` and
      other lines 0100-0199 (``len(AREA_CODES) * 100 - 1`` candidates at most for a 10-digit
      number, 99 for a 7-digit one).
    - EMAIL: the same pattern (first.last, first_last or flast) and domain, with other Faker
      names.
    - NAME: other Faker names, "First Last", or a first name alone for a one-word name.
    - ADDRESS: other Faker addresses in the corpus format "1234 Oak Street, City, ST 12345".

    Raises ValueError for another type, or when fewer than ``n`` candidates exist.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if type == "PHONE":
        return _phone_candidates(item_text, n, rng)

    faker = _seeded_faker(locale, rng.getrandbits(64))
    if type == "EMAIL":
        draw = _email_candidate_drawer(item_text, faker)
    elif type == "NAME":
        draw = _name_candidate_drawer(item_text, faker)
    elif type == "ADDRESS":
        draw = functools.partial(_fake_address, faker)
    else:
        raise ValueError(
            f"no candidate generator for PII type {type!r}; supported: PHONE, EMAIL, NAME, ADDRESS"
        )
    return _draw_distinct(draw, item_text, n)


def _draw_distinct(draw: Any, item_text: str, n: int) -> list[str]:
    found: dict[str, None] = {}
    attempts = 0
    max_attempts = 50 * n + 100
    while len(found) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"found only {len(found)} distinct candidates for {item_text!r} after "
                f"{max_attempts} draws, fewer than the {n} requested; request fewer"
            )
        candidate = draw()
        if candidate != item_text:
            found[candidate] = None
    return list(found)


def _email_candidate_drawer(item_text: str, faker: Faker) -> Any:
    local, separator, domain = item_text.rpartition("@")
    if not separator or not local:
        raise ValueError(f"{item_text!r} is not an e-mail address of the form local@domain")
    if "." in local:
        pattern = "first.last"
    elif "_" in local:
        pattern = "first_last"
    else:
        pattern = "flast"

    def draw() -> str:
        return f"{_email_local_part(faker.first_name(), faker.last_name(), pattern)}@{domain}"

    return draw


def _name_candidate_drawer(item_text: str, faker: Faker) -> Any:
    if len(item_text.split()) == 1:
        return faker.first_name
    return lambda: f"{faker.first_name()} {faker.last_name()}"


def _phone_candidates(item_text: str, n: int, rng: random.Random) -> list[str]:
    digit_positions = [i for i, char in enumerate(item_text) if char.isdigit()]
    if len(digit_positions) < 7:
        raise ValueError(
            f"{item_text!r} has {len(digit_positions)} digits; a PHONE candidate needs at least "
            "7 (exchange and line)"
        )
    line_positions = digit_positions[-4:]
    area_positions = digit_positions[-10:-7] if len(digit_positions) >= 10 else []
    areas = AREA_CODES if area_positions else ("",)

    pool = []
    for area in areas:
        for line in PHONE_LINES:
            chars = list(item_text)
            positions = [*area_positions, *line_positions]
            for position, digit in zip(positions, area + line, strict=False):
                chars[position] = digit
            candidate = "".join(chars)
            if candidate != item_text:
                pool.append(candidate)

    if n > len(pool):
        raise ValueError(
            f"only {len(pool)} phone candidates exist for {item_text!r}, fewer than the "
            f"{n} requested"
        )
    return rng.sample(pool, n)
