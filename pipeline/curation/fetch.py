"""Bringing one file's bytes to local disk, on the worker: `fetch` downloads a remote URL
(local paths are returned as they are) into a cache directory, once.

A download has a total deadline per file (`timeout_s`, retries included), a read timeout
(`read_timeout_s`: a server that accepts and never answers) and a byte cap (`max_bytes`);
transient failures are retried with backoff (`pipeline.curation.retry`). Failures raise
`FetchError` with an ingest reject reason: `fetch_failed`, `too_large` or `fetch_timeout`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import queue
import threading
import uuid
from urllib.parse import urlsplit

import aiohttp
from fsspec.core import url_to_fs

from data.storage import is_url
from pipeline.curation.retry import describe, is_transient, retry

DEFAULT_FETCH_TIMEOUT_S = 600.0  # total per file, retries included
DEFAULT_READ_TIMEOUT_S = 60.0  # connecting, or waiting for the next bytes


class FetchError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def is_remote(url: str) -> bool:
    return is_url(url)


class _Deadline(Exception):
    """The caller stopped waiting for a download (its thread may still be finishing)."""


class _FetchThreads:
    """Daemon threads that run downloads, so a caller can stop waiting at the deadline
    whatever the transport is blocked in. Reused: fsspec keeps one filesystem instance (one
    HTTP session) per thread. A thread whose download was abandoned ends by itself (its
    transport's read timeout, or the cancel flag between chunks); until then others serve."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def run(self, fn, timeout_s: float):
        """fn() in a download thread; raises _Deadline after `timeout_s`."""
        done, out = threading.Event(), {}

        def job():
            try:
                out["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                out["error"] = e
            finally:
                done.set()

        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                threading.Thread(target=self._serve, name="spacetime-fetch", daemon=True).start()
        self._jobs.put(job)
        if not done.wait(timeout_s):
            raise _Deadline
        if "error" in out:
            raise out["error"]
        return out["value"]

    def _serve(self):
        while True:
            self._jobs.get()()
            with self._lock:
                self._idle += 1


@functools.lru_cache(maxsize=1)
def _fetch_threads(pid: int) -> _FetchThreads:  # per process: threads do not survive a fork
    return _FetchThreads()


def with_timeouts(url: str, storage_options: dict, read_timeout_s: float | None,
                  timeout_s: float | None) -> dict:
    """`storage_options` plus the transport's own timeouts (unless they set them): aiohttp's
    for http(s) (each request also ends by the deadline), botocore's for s3."""
    so = dict(storage_options)
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        ck = dict(so.get("client_kwargs") or {})
        ck.setdefault("timeout", aiohttp.ClientTimeout(
            total=timeout_s or None, sock_connect=read_timeout_s or None,
            sock_read=read_timeout_s or None))
        so["client_kwargs"] = ck
    elif scheme in ("s3", "s3a") and read_timeout_s:
        ck = dict(so.get("config_kwargs") or {})
        ck.setdefault("connect_timeout", read_timeout_s)
        ck.setdefault("read_timeout", read_timeout_s)
        so["config_kwargs"] = ck
    return so


def fetch(url: str, cache_dir: str | os.PathLike, *, max_bytes: int | None = None,
          storage_options: dict | None = None, retries: int = 3, backoff_s: float = 1.0,
          timeout_s: float | None = DEFAULT_FETCH_TIMEOUT_S,
          read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S) -> str:
    """A local path holding `url`'s bytes. Local paths (and file:// URLs) are returned as
    they are; remote ones are downloaded once into `cache_dir` (named by the URL's hash,
    written to a temporary name and renamed, so a crash never leaves a partial file that
    looks complete). A transient failure (a 5xx, a reset connection, a timeout: see
    `pipeline.curation.retry`) is retried up to `retries` times with exponential backoff from
    `backoff_s`; a permanent one (404, 403) is not. The whole download, retries included,
    has `timeout_s` (None: no deadline); connecting and each wait for bytes `read_timeout_s`.
    Raises FetchError("too_large" | "fetch_failed" | "fetch_timeout")."""
    if not is_remote(url):
        return url.removeprefix("file://")
    os.makedirs(cache_dir, exist_ok=True)
    ext = posixpath.splitext(urlsplit(url).path)[1][:8]
    dest = os.path.join(os.fspath(cache_dir), hashlib.sha1(url.encode()).hexdigest() + ext)
    if os.path.exists(dest):
        return dest
    tmp = f"{dest}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
    so = with_timeouts(url, storage_options or {}, read_timeout_s, timeout_s)
    cancelled = threading.Event()
    late = FetchError("fetch_timeout", "abandoned at the deadline")

    def attempt() -> str:
        if cancelled.is_set():
            raise late
        fs, path = url_to_fs(url, **so)
        size = fs.size(path)  # may be None (an HTTP server without Content-Length)
        if max_bytes is not None and size is not None and size > max_bytes:
            raise FetchError("too_large", f"{size} bytes > {max_bytes}")
        copied = 0
        with fs.open(path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                if cancelled.is_set():
                    raise late
                copied += len(chunk)
                if max_bytes is not None and copied > max_bytes:
                    raise FetchError("too_large", f"more than {max_bytes} bytes")
                dst.write(chunk)
        os.replace(tmp, dest)
        return dest

    def download() -> str:
        try:
            return retry(attempt, attempts=retries + 1, backoff_s=backoff_s)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    try:
        if not timeout_s:
            return download()
        return _fetch_threads(os.getpid()).run(download, timeout_s)
    except _Deadline:
        cancelled.set()
        raise FetchError("fetch_timeout", f"not downloaded in {timeout_s:g}s "
                                          f"(ingest.fetch_timeout_s)") from None
    except FetchError:
        raise
    except Exception as e:  # noqa: BLE001 - any transport error is this file's problem
        tried = f" (after {retries + 1} attempts)" if is_transient(e) and retries else ""
        raise FetchError("fetch_failed", describe(e)[:300] + tried) from e


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
