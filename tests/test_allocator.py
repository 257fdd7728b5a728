"""keep_freed_memory: large freed blocks stay in the process instead of going back to the kernel.

Each case runs in a subprocess, because the settings hold for the whole process. The
subprocess loads the module from its file, which skips the package's torch import.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

import tl_privacy.allocator

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the settings are glibc's; elsewhere keep_freed_memory changes nothing",
)

BLOCK_MIB = 256

SCRIPT = f"""
import importlib.util
import sys

spec = importlib.util.spec_from_file_location("allocator", sys.argv[2])
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)

def resident_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20

applied = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
block = bytearray({BLOCK_MIB} * 2**20)
block[::4096] = b"x" * len(block[::4096])
touched = resident_mib()
del block
print(applied, touched - resident_mib())
"""


def released_mib(mode: str) -> tuple[bool, float]:
    """Run SCRIPT and return whether the settings applied and the MiB freeing gave back."""
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, tl_privacy.allocator.__file__],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    applied, released = completed.stdout.split()
    return applied == "True", float(released)


def test_freed_block_stays_resident():
    applied, released = released_mib("keep")

    assert applied
    assert released < BLOCK_MIB / 8


def test_default_allocator_gives_the_block_back():
    applied, released = released_mib("default")

    assert not applied
    assert released > BLOCK_MIB / 2
