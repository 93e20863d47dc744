"""Damage a real shard the way storage and transfers do: a garbled member header mid-tar."""

from __future__ import annotations

import tarfile
from pathlib import Path


def garble_header(path: str | Path, key: str) -> None:
    """Overwrite the mode field of the first member of sample `key`: its header checksum no
    longer matches, and Python's tarfile (so WebDataset) takes it for the end of the archive,
    silently: every sample from `key` on is gone."""
    with tarfile.open(path) as tf:
        member = next(m for m in tf.getmembers() if m.name.split(".")[0] == key)
    with open(path, "r+b") as f:
        f.seek(member.offset + 100)  # the header's mode field (bytes 100-107)
        f.write(b"\xff" * 8)
