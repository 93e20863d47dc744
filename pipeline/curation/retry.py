"""Retrying transient failures with backoff, and only those.

A crawl of millions of files meets servers that answer 503 for a minute, connections reset
mid-download and requests that time out: one such failure must not become a permanent
reject saved into a part, nor a failed shard upload. A missing file (404), a refused one
(403) or a bad request is not transient: retrying it only delays the reject.

`is_transient` classifies an exception (or one it was raised from): HTTP statuses 5xx (but
501 and 505), 408 and 429 (``.status``, as aiohttp and fsspec's HTTP filesystem report them, or ``.code``);
connection and timeout errors (Python's, aiohttp's and botocore's, by name, so neither
library needs to be imported); OS errors of a dropped connection. Everything else, and
``FileNotFoundError`` / ``PermissionError`` in particular (unless raised from one of the
above), is permanent.
"""

from __future__ import annotations

import errno
import random
import time
from typing import Callable, TypeVar

T = TypeVar("T")

_TRANSIENT_NAMES = {  # aiohttp, botocore, urllib3, requests
    "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError",
    "ClientPayloadError", "ServerTimeoutError", "ClientOSError", "EndpointConnectionError",
    "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError", "ProtocolError",
    "IncompleteRead", "ChunkedEncodingError",
}
_TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                    errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETRESET,
                    errno.EAGAIN}


class TransientError(Exception):
    """A transient failure that outlasted its retries: worth retrying later (Ray tasks list
    it in ``retry_exceptions``)."""


def _status(e: BaseException) -> int | None:
    for attr in ("status", "code", "status_code"):
        v = getattr(e, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v
    return None


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def describe(exc: BaseException) -> str:
    """'Type: message', with the HTTP status of a cause when the error itself hides it, or
    else the first cause of another type (fsspec reports a read timeout as FileNotFoundError)."""
    text = f"{type(exc).__name__}: {exc}"
    chain = list(_chain(exc))
    status = next((_status(e) for e in chain if _status(e) is not None), None)
    if status is not None:
        return f"{text} (HTTP {status})" if str(status) not in text else text
    cause = next((e for e in chain if type(e) is not type(exc)), None)
    return f"{text} (from {type(cause).__name__}: {cause})" if cause is not None else text


def is_transient(exc: BaseException) -> bool:
    """The whole chain of causes is read: fsspec's HTTP filesystem reports a 503 while it
    looks up a file's size as ``FileNotFoundError`` raised from the 503."""
    chain = list(_chain(exc))
    for e in chain:  # an HTTP status decides
        status = _status(e)
        if status is not None:
            return (status >= 500 and status not in (501, 505)) or status in (408, 429)
    for e in chain:
        if isinstance(e, (TransientError, ConnectionError, TimeoutError)):
            return True
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
            return True
    return False


def retry(fn: Callable[[], T], *, attempts: int, backoff_s: float, max_backoff_s: float = 30.0,
          transient: Callable[[BaseException], bool] = is_transient,
          log: Callable[[str], None] | None = None) -> T:
    """``fn()``, tried up to `attempts` times while it raises transient errors, sleeping
    ``backoff_s * 2**i`` (capped, with jitter) between tries. A permanent error is raised at
    once; the last transient one is raised after the last attempt."""
    for i in range(max(1, attempts)):
        try:
            return fn()
        except Exception as e:
            if i + 1 >= attempts or not transient(e):
                raise
            wait = min(max_backoff_s, backoff_s * 2**i) * random.uniform(0.5, 1.0)
            if log:
                log(f"transient failure ({type(e).__name__}: {e}); retry {i + 1} of "
                    f"{attempts - 1} in {wait:.2f}s")
            time.sleep(wait)
    raise AssertionError("unreachable")
