"""Write one benchmark's section of ``docs/benchmarks.md`` without touching the others.

Each script owns the text between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``.
A script that runs again replaces its own section; a new section goes at the end.
The file is replaced in one rename, so an interrupted write leaves the old file.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Each section below is written by the script its command names; run it again to\n"
    "refresh the section. Times are wall-clock seconds on the machine the section names.\n"
)


def command_line() -> str:
    """Return the command that is running, as a user would type it from the project root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def machine() -> str:
    """Return a one-line description of the CPU, thread count and torch version."""
    return (
        f"{cpu_name()}, {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )


def cpu_name() -> str:
    """Return the CPU model name from /proc/cpuinfo, else ``platform.processor()``, else the
    architecture. On Linux ``platform.processor()`` is often empty."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_section(name: str, title: str, body: str, doc: Path = DOC) -> Path:
    """Replace (or append) section ``name`` of ``doc`` with ``title`` and ``body``.

    The section starts with the command line, the date and the machine, so every
    table in the file records how it was made.
    """
    if not re.fullmatch(r"[a-z0-9_-]+", name):
        raise ValueError(
            f"section name must be lower-case letters, digits, '-' or '_', got {name!r}"
        )
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    section = (
        f"{begin}\n## {title}\n\n"
        f"Command: `{command_line()}`  \n"
        f"Run on {date.today().isoformat()}; {machine()}.\n\n"
        f"{body.strip()}\n{end}"
    )

    text = doc.read_text(encoding="utf-8") if doc.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    text = text.rstrip("\n") + "\n"

    doc.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=doc.parent, prefix=".benchmarks-", suffix=".md")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(temporary, doc)
    return doc


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """Return a GitHub markdown table; floats keep three significant decimals."""

    def cell(value: object) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
