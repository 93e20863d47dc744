"""WebDataset shards of clips, and parquet tables of per-clip rows.

A shard is a plain tar: sample `key` is stored as members `key.mp4`,
`key.json` and `key.txt`. Shards are uncompressed (mp4 does not compress
further) and written with a fixed member mtime and sorted member order, so the
same samples give the same shard bytes. Keys must not contain "." because
WebDataset splits member names at the first dot of the basename to recover the
key.

Everything is written to `path + ".tmp"` and renamed into place, so a crashed
writer never leaves a file that looks complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from webdataset.gopen import gopen_schemes

SHARD_MTIME = 0.0  # fixed tar member mtime, for reproducible shard bytes


def write_shard(path: str | os.PathLike, samples: Iterable[dict]) -> int:
    """Write samples ({"__key__": str, "mp4": bytes, "json": dict, "txt": str})
    to the tar at `path`; return its size in bytes.

    TarWriter's default encoder serialises a dict under "json" with json.dumps
    and a str under "txt" as UTF-8; bytes are stored as they are.
    """
    path = os.fspath(path)
    if not path.endswith(".tar"):
        raise ValueError(f"shard path must end in .tar (shards are uncompressed): {path}")
    tmp = path + ".tmp"
    try:
        with wds.TarWriter(tmp, compress=False, mtime=SHARD_MTIME) as writer:
            for sample in samples:
                key = sample["__key__"]
                if "." in key:
                    raise ValueError(f"shard keys must not contain '.': {key!r}")
                writer.write(sample)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


def _fsspec_open(url, mode="rb", bufsize=8192, **kw):
    """WebDataset opener for any fsspec URL (s3://, gs://, az://, memory://, ...)."""
    import fsspec

    return fsspec.open(url, mode).open()


# Schemes WebDataset has no handler of its own for go through fsspec (its built-ins: pipe:,
# http(s):// via curl, gs:// via gsutil, ...). Remote filesystems need their fsspec package
# (s3fs, gcsfs, adlfs) installed on the workers.
gopen_schemes["__default__"] = _fsspec_open


def _all_urls(urls):
    yield from urls


def read_shards(urls: str | list[str], decode_json: bool = True, decode_text: bool = True,
                handler=None) -> Iterator[dict]:
    """Yield samples from shards in order: "mp4" as raw bytes, "txt" as str,
    "json" as a dict (raw bytes if decode_json=False, "txt" likewise with
    decode_text=False), plus WebDataset's "__key__", "__url__" and
    "__local_path__".

    An empty shard yields nothing (WebDataset's empty_check is off: a shard
    whose clips were all rejected is legitimate). `handler(exception) -> bool`
    sees errors reading a shard (a truncated or garbled tar); True goes on
    with the next shard (WebDataset's protocol). By default they raise.
    """
    urls = [os.fspath(u) for u in urls] if isinstance(urls, (list, tuple)) else os.fspath(urls)
    kw = {"handler": handler} if handler is not None else {}
    # Callers split shards across ranks and loader workers themselves: every url given is read.
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False,
                                 nodesplitter=_all_urls, workersplitter=_all_urls, **kw):
        if decode_text and "txt" in sample:
            sample["txt"] = sample["txt"].decode("utf-8")
        if decode_json and "json" in sample:
            sample["json"] = json.loads(sample["json"])
        yield sample


def write_parquet(rows: list[dict], path: str | os.PathLike, schema: dict | None = None) -> None:
    """Write rows as a parquet table at `path`, atomically.

    `schema` (column -> pyarrow type, or its alias such as "string" or
    "int64") fixes the columns; without it types are inferred from the rows.
    Pass it whenever rows may be empty, so an empty table (e.g. no rejects)
    still has its columns. With a schema, missing keys become nulls and keys
    outside it raise ValueError rather than being dropped silently.
    """
    path = os.fspath(path)
    pa_schema = None
    if schema is not None:
        pa_schema = pa.schema(list(schema.items()))
        extra = {k for row in rows for k in row} - set(schema)
        if extra:
            raise ValueError(f"row keys not in schema: {sorted(extra)}")
    table = pa.Table.from_pylist(rows, schema=pa_schema)
    tmp = path + ".tmp"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_parquet(path: str | os.PathLike) -> list[dict]:
    return pq.read_table(os.fspath(path)).to_pylist()
