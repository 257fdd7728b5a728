"""General English prose, for measuring and keeping what ablating neurons costs outside PII.

Two texts ship in ``tl_privacy/resources/``, each with a first line that names it:

- ``general_text.txt``: chapters I and II of Lewis Carroll's "Alice's Adventures in
  Wonderland" (1865, public domain). Evaluation measures general-text perplexity on it.
- ``keep_text.txt``: twelve short everyday essays written for this project (CC0). The demo's
  localization keeps the model's predictions on it, so that neurons the model needs for
  ordinary English are not chosen, while the perplexity is still measured on text the gates
  never trained on.
"""

from __future__ import annotations

from importlib import resources

GENERAL_TEXT_RESOURCE = "general_text.txt"
KEEP_TEXT_RESOURCE = "keep_text.txt"


def general_text() -> str:
    """Return the shipped public-domain prose without its header line (about 5,500 SmolLM2
    tokens, 4,300 words)."""
    return _read(GENERAL_TEXT_RESOURCE)


def keep_text() -> str:
    """Return the essays for the keep term, one paragraph per essay (about 1,600 SmolLM2
    tokens, 1,200 words), without the header line."""
    return _read(KEEP_TEXT_RESOURCE)


def _read(name: str) -> str:
    resource = resources.files("tl_privacy").joinpath("resources", name)
    raw = resource.read_text(encoding="utf-8")
    header, _, body = raw.partition("\n")
    if not header.startswith("#"):
        raise RuntimeError(
            f"{name} must start with a '#' header line naming the work; "
            "the packaged file is damaged, reinstall tl-privacy"
        )
    return body.strip() + "\n"
