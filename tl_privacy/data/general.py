"""General English prose, for measuring what ablating neurons costs outside PII.

The text is chapters I and II of Lewis Carroll's "Alice's Adventures in Wonderland" (1865,
public domain), shipped as ``tl_privacy/resources/general_text.txt``. The file's first line
names the work and its source edition; ``general_text`` returns the prose after it.
"""

from __future__ import annotations

from importlib import resources

GENERAL_TEXT_RESOURCE = "general_text.txt"


def general_text() -> str:
    """Return the shipped public-domain prose without its header line (about 5,500 SmolLM2
    tokens, 4,300 words)."""
    resource = resources.files("tl_privacy").joinpath("resources", GENERAL_TEXT_RESOURCE)
    raw = resource.read_text(encoding="utf-8")
    header, _, body = raw.partition("\n")
    if not header.startswith("#"):
        raise RuntimeError(
            f"{GENERAL_TEXT_RESOURCE} must start with a '#' header line naming the work; "
            "the packaged file is damaged, reinstall tl-privacy"
        )
    return body.strip() + "\n"
