"""WebDataset shards of clips, and parquet tables of per-clip rows.

A shard is a plain tar: sample `key` is stored as members `key.mp4`,
`key.json` and `key.txt`. Shards are uncompressed (mp4 does not compress
further) and written with a fixed member mtime and sorted member order, so the
same samples give the same shard bytes. Keys must not contain "." because
WebDataset splits member names at the first dot of the basename to recover the
key.

Everything is written to `path + ".tmp"` and renamed into place, so a crashed
writer never leaves a file that looks complete.

Sidecars: the stages that write shards put ``<shard>.rows.json`` beside each tar
(`write_sidecar`: ``{"shard", "rows": [{"key", ...}, ...], ...}``, written after the tar), one
row per sample the tar holds. That count is how a reader tells a whole shard from a damaged
one: Python's `tarfile` (under WebDataset) takes a garbled member header in the middle of a
tar for the end of the archive and raises nothing, so without it the rest of the shard would
vanish silently. `read_shards` checks every shard against its sidecar (`ShardIncomplete`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand

from data.storage import has_scheme

SHARD_MTIME = 0.0  # fixed tar member mtime, for reproducible shard bytes
SIDECAR = ".rows.json"  # <shard>.rows.json: one row per sample the shard holds


class ShardIncomplete(IOError):
    """A shard yielded fewer samples than its sidecar lists: the tar is damaged (truncated,
    or a garbled member header, which tarfile reads as the end of the archive)."""

    def __init__(self, url: str, expected: int, got: int):
        self.url, self.expected, self.got = url, expected, got
        super().__init__(f"shard {url}: read {got} of the {expected} samples its {SIDECAR} "
                         f"lists, {expected - got} lost: the tar is damaged (truncated, or a "
                         f"garbled member header); rerun the stage that wrote it")

    @property
    def missing(self) -> int:
        return self.expected - self.got


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
        with _wds().TarWriter(tmp, compress=False, mtime=SHARD_MTIME) as writer:
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


def write_sidecar(path: str | os.PathLike, side: dict) -> None:
    """Write ``<path>.rows.json`` atomically; ``side["rows"]`` has one entry per sample of the
    tar at `path`. Write it after the tar: its presence says the tar is complete."""
    tmp = f"{os.fspath(path)}{SIDECAR}.tmp"
    with open(tmp, "w") as f:
        json.dump(side, f)
    os.replace(tmp, f"{os.fspath(path)}{SIDECAR}")


def sidecar_count(url: str | os.PathLike) -> int | None:
    """How many samples the shard at `url` holds, from its sidecar; None without one (a shard
    written by `write_shard` alone). A sidecar that is there but unreadable raises."""
    side = os.fspath(url) + SIDECAR
    if has_scheme(side):
        fs, path = fsspec.core.url_to_fs(side)
        if not fs.exists(path):
            return None
        with fs.open(path, "r") as f:
            text = f.read()
    elif not os.path.exists(side):
        return None
    else:
        with open(side) as f:
            text = f.read()
    try:
        return len(json.loads(text)["rows"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{side}: not a shard sidecar ({type(e).__name__}: {e})") from None


def _fsspec_open(url, mode="rb", bufsize=8192, **kw):
    """WebDataset opener for any fsspec URL (s3://, gs://, az://, memory://, ...)."""
    return fsspec.open(url, mode).open()


def _wds():
    """webdataset, with the schemes it has no handler of its own for (its built-ins: pipe:,
    http(s):// via curl, gs:// via gsutil, ...) going through fsspec. Remote filesystems need
    their fsspec package (s3fs, gcsfs, adlfs) installed on the workers."""
    import webdataset as wds  # lazy: it imports torch (~3 GB of address space); the curation media child, under a memory cap, imports this module for its parquet helpers

    from webdataset.gopen import gopen_schemes

    gopen_schemes["__default__"] = _fsspec_open
    return wds


def _all_urls(urls):
    yield from urls


def read_shards(urls: str | list[str], decode_json: bool = True, decode_text: bool = True,
                handler=None, verify: bool = True) -> Iterator[dict]:
    """Yield samples from shards in order: "mp4" as raw bytes, "txt" as str,
    "json" as a dict (raw bytes if decode_json=False, "txt" likewise with
    decode_text=False), plus WebDataset's "__key__", "__url__" and
    "__local_path__".

    An empty shard yields nothing (WebDataset's empty_check is off: a shard
    whose clips were all rejected is legitimate). A damaged shard raises by
    default: a truncated or garbled tar, and (with `verify`) a shard that
    yields fewer samples than its sidecar lists (`ShardIncomplete`, raised
    after its last readable sample), which is how a garbled member header,
    which tarfile silently takes for the end of the archive, is caught.
    `handler(exception) -> bool` sees those errors instead (WebDataset's
    protocol: True goes on with the next shard, False stops); the sample the
    damage cut short is dropped. A shard with more samples than its sidecar
    lists always raises: the sidecar belongs to another tar.
    """
    if isinstance(urls, (list, tuple)):
        urls = [os.fspath(u) for u in urls]
    else:  # one url or a brace pattern ("train-{000000..000009}.tar"), as WebDataset takes
        urls = list(braceexpand(os.fspath(urls)))
    for url in urls:
        expected = sidecar_count(url) if verify else None
        failed: list[Exception] = []
        go_on = [True]

        def on_error(exn: Exception) -> bool:
            if handler is None:
                raise exn
            failed.append(exn)
            go_on[0] = bool(handler(exn))
            return go_on[0]

        got = 0
        # Callers split shards across ranks and loader workers themselves: every url is read.
        for sample in _wds().WebDataset([url], shardshuffle=False, empty_check=False,
                                     nodesplitter=_all_urls, workersplitter=_all_urls,
                                     handler=on_error):
            if failed:
                continue  # the sample cut short by the damage (webdataset yields what it got)
            got += 1
            if expected is not None and got > expected:
                raise ValueError(f"shard {url} holds more samples than the {expected} its "
                                 f"{SIDECAR} lists: the sidecar belongs to another tar")
            if decode_text and "txt" in sample:
                sample["txt"] = sample["txt"].decode("utf-8")
            if decode_json and "json" in sample:
                sample["json"] = json.loads(sample["json"])
            yield sample
        if expected is not None and got < expected:
            on_error(ShardIncomplete(url, expected, got))
        if not go_on[0]:
            return


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
