"""The tl_privacy cache folder, and folders written in one rename.

Converted models and memorized weights are stored under ``cache_dir()``. Every entry is a
folder that is written next to its final place under a temporary name and then renamed. A
crash or an interrupt therefore leaves no half-written entry behind, because an entry either
exists completely or not at all. Saved neuron sets and masks are written the same way
(:func:`replaced_folder`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CACHE_ENV = "TL_PRIVACY_CACHE"
DEFAULT_CACHE = Path("~/.cache/tl_privacy")

logger = logging.getLogger("tl_privacy")


def cache_dir() -> Path:
    """Return the cache root: ``$TL_PRIVACY_CACHE`` if set, else ``~/.cache/tl_privacy``.

    The folder is not created here, so reading the setting has no side effects.
    """
    configured = os.environ.get(CACHE_ENV, "").strip()
    root = Path(configured) if configured else DEFAULT_CACHE
    return root.expanduser()


def cache_entry(kind: str, key: str, root: str | Path | None = None) -> Path:
    """Return the path of entry ``key`` in the ``kind`` section of the cache (not created).

    ``root`` overrides ``cache_dir()``.
    """
    if not key or "/" in key or "\\" in key or key in (".", ".."):
        raise ValueError(f"invalid cache key {key!r}: use a non-empty name without path separators")
    base = Path(root).expanduser() if root is not None else cache_dir()
    return base / kind / key


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes ``target`` when the block succeeds.

    The temporary folder is created in ``target``'s parent, so the final ``os.replace`` is a
    rename within one file system. If the block raises, the temporary folder is deleted and
    ``target`` is left untouched. If ``target`` appeared meanwhile (another process filled the
    same entry), the existing folder is kept and the new copy is discarded, because entries
    are keyed by their content.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        try:
            os.replace(staging, target)
        except OSError:
            if not target.exists():
                raise
            logger.info("cache entry %s was written by another process; keeping it", target)
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def replaced_folder(target: str | Path, own_files: tuple[str, ...], kind: str) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``target`` when the block succeeds.

    ``target`` may be absent, an empty folder, or a folder of ``own_files`` only (an earlier
    save of the same kind, named ``kind`` in messages), which is replaced whole. Anything
    else raises FileExistsError before anything is written, so that a save never deletes a
    user's other files. If the block raises, ``target`` is left as it was.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file; give a folder path to save the {kind} in.")
    others = foreign_entries(target, own_files)
    if others:
        raise FileExistsError(
            f"{target} contains files that are not part of a saved {kind} ({others}); save to "
            f"a new or empty folder, or to one that contains only an earlier {kind}."
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    follow_umask(staging)
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def follow_umask(path: Path) -> None:
    """Give the folder or file ``path`` the permissions that ``mkdir`` or ``open`` would, by
    the process' umask.

    ``tempfile.mkdtemp`` creates folders, and safetensors files, that only their owner can
    read (0700 and 0600), which would keep colleagues on a shared machine out of a saved set
    or report.
    """
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def foreign_entries(folder: Path, own: tuple[str, ...]) -> str | None:
    """Return the names in ``folder`` other than ``own`` (the first five, comma-separated), or
    None when there are none or ``folder`` is not a folder."""
    if not folder.is_dir():
        return None
    others = sorted(p.name for p in folder.iterdir() if p.name not in own)
    if not others:
        return None
    return ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")


def read_config_json(path: Path) -> dict[str, Any]:
    """Return the JSON object in ``path``, the config of a saved folder.

    Raises:
        ValueError: naming ``path`` when it is not valid JSON or not an object.
    """
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the folder is damaged.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} contains no JSON object; the folder is damaged.")
    return config


def read_safetensors(path: Path) -> dict[str, Any]:
    """Return the tensors in the safetensors file ``path``.

    Raises:
        ValueError: naming ``path`` when the file cannot be read.
    """
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}); the folder is damaged."
        ) from None
