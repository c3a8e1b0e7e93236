"""Directories and files only their owner may open, private from the moment they exist.

A file written and then chmod-ed can be opened by another user in between (and stays readable
through that descriptor); these are created with their final mode instead.
"""

from __future__ import annotations

import os
from pathlib import Path

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


def make_private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents, mode 0700; directories that exist are left as they are."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(mode=DIRECTORY_MODE, exist_ok=True)
    return path


def open_private(path: Path, flags: int) -> int:
    """``os.open`` that creates ``path`` with mode 0600 (an existing file of ours is made 0600 too)."""
    descriptor = os.open(path, flags | os.O_CREAT, FILE_MODE)
    os.fchmod(descriptor, FILE_MODE)
    return descriptor


def write_private(path: Path, data: bytes) -> None:
    """Write ``path`` whole, mode 0600 from creation; a crash leaves the old file or the new one."""
    make_private_dir(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.new")
    with os.fdopen(open_private(temporary, os.O_WRONLY | os.O_TRUNC), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
