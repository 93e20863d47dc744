"""Read a W&B offline run back: its records, history rows and logged tables.

wandb (0.19+) writes an offline run as ``run-<id>.wandb``: a LevelDB-style log (a 7-byte
``:W&B`` header, then 32 KiB blocks of records, each a 7-byte header ``crc32, length, type``
and a chunk; type 1 = a whole record, 2/3/4 = first/middle/last chunk of one) whose records are
``wandb_internal_pb2.Record`` protobufs, the same ones ``wandb sync`` uploads. Since its Python
reader went into the Go core, tests read the file with this small decoder and wandb's own
protobuf classes, and assert on what a dashboard would show.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def parse(data: bytes) -> list:
    """The ``Record`` protobufs in a ``.wandb`` file's bytes, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, (ident, magic)
    out, pos, chunks = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:  # zero padding: the end
            break
        chunks += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(chunks)
            out.append(rec)
            chunks = b""
    return out


def records(run_dir: Path, timeout: float = 60.0) -> list:
    """The run's records, once the file is complete (it ends with the run's exit record).

    ``run.finish()`` returns when the service has the exit record, but wandb-core writes the
    file in 32 KiB blocks and flushes the last one when it closes the stream, a moment later;
    so this waits for that condition (polling the file), up to `timeout` seconds."""
    path = next(Path(run_dir).glob("run-*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        recs = parse(path.read_bytes())
        if any(r.WhichOneof("record_type") == "exit" for r in recs):
            return recs
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout}s ({len(recs)} records)")
        time.sleep(0.05)


def history(run_dir: Path) -> list[dict]:
    """Each ``run.log`` call as a dict; logged objects (tables, histograms) as their dicts."""
    rows = []
    for rec in records(run_dir):
        if rec.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in rec.history.item:
            value = json.loads(item.value_json)
            if item.key:
                row[item.key] = value
            else:  # a nested value, e.g. ["funnel", "path"]
                d = row
                for k in item.nested_key[:-1]:
                    d = d.setdefault(k, {})
                d[item.nested_key[-1]] = value
        rows.append(row)
    return rows


def logged(run_dir: Path) -> dict:
    """Every key's last logged value over the history."""
    out: dict = {}
    for row in history(run_dir):
        out.update(row)
    return out


def table(run_dir: Path, value: dict) -> dict:
    """A logged table's content ({"columns": [...], "data": [[...]]}) from the run's files."""
    assert value["_type"] == "table-file", value
    return json.loads((Path(run_dir) / "files" / value["path"]).read_text())
