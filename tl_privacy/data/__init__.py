"""PII records, automatic labels, tokenization with PII labels, and the bundled corpora."""

from tl_privacy.data.general import general_text, keep_text
from tl_privacy.data.labelling import find_emails, find_phone_numbers, label_pii
from tl_privacy.data.records import (
    PII_TYPES,
    InvalidRecordError,
    PIIRecord,
    PIISpan,
    add_automatic_labels,
    load_records,
)
from tl_privacy.data.synthetic import (
    Person,
    PIICorpus,
    SyntheticCorpusConfig,
    candidates_for,
    generate_corpus,
)
from tl_privacy.data.tokenization import (
    PIIItem,
    TokenizedRecord,
    collate,
    make_batches,
    pad_token_id,
    pii_items,
    tokenize_record,
    type_names_for,
)

__all__ = [
    "PII_TYPES",
    "InvalidRecordError",
    "PIICorpus",
    "PIIItem",
    "PIIRecord",
    "PIISpan",
    "Person",
    "SyntheticCorpusConfig",
    "TokenizedRecord",
    "add_automatic_labels",
    "candidates_for",
    "collate",
    "find_emails",
    "find_phone_numbers",
    "general_text",
    "keep_text",
    "generate_corpus",
    "label_pii",
    "load_records",
    "make_batches",
    "pad_token_id",
    "pii_items",
    "tokenize_record",
    "type_names_for",
]
