"""Read the records of an offline W&B run (``run-*.wandb``) in tests.

wandb 0.31 moved its reader into the Go core, so this is the file format spelled out: a
7-byte header (``:W&B``, magic 0xBEE1, version 0), then LevelDB-log blocks of 32 KiB whose
chunks (crc32, length, type: full / first / middle / last) carry serialised protobuf
``Record`` messages (``wandb.proto.wandb_internal_pb2``).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Iterator

BLOCK = 32 * 1024
CHUNK_HEADER = 7  # crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B" or struct.unpack("<HB", data[4:7]) != (0xBEE1, 0):
        raise ValueError(f"{path} is not a W&B run file")
    pos, parts = 7, []
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # the block's tail is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0 and length == 0:
            continue
        if zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        parts.append(chunk)
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


def records_of(run_dir: str | Path, kind: str) -> list:
    """The run's records of one type ("history", "summary", "artifact", "config", ...)."""
    f = next(Path(run_dir).glob("run-*.wandb"))
    return [r for r in read_records(f) if r.WhichOneof("record_type") == kind]
