"""Running work on untrusted media in a reused child process, under a timeout and a memory cap.

A decoder that segfaults, aborts (``std::bad_alloc`` from a frame array the file makes it
allocate), loops or allocates without bound must not take the process that asked for the
work with it: in a Ray worker that would crash the worker, and Ray would run the task again,
and again. `Isolated` runs named functions (``"package.module:function"``) in a long-lived
child process (``python -m data.isolate``) and talks to it over a pipe:

- the parent enforces a wall-clock timeout per call; past it the child is killed and the
  next call starts a fresh one;
- the child limits its own address space (``RLIMIT_AS``, `max_memory_mb`) and writes no core
  files, so unbounded allocation fails inside the child: as a ``MemoryError`` (a reply) or as
  the child's death (``abort`` on ``std::bad_alloc``), never as the parent's;
- a child that dies mid-call (a signal or an exit) is reported as ``crashed`` with its exit
  code, and replaced on the next call;
- the child exits when its parent dies (even while stuck in a blocking ``open``).

Reusing the child keeps the cost per call to one round trip over the pipe (~0.1-1 ms and a
copy of the reply), against a process start with its imports (~0.5-2 s for PyAV, decord and
OpenCV) per call. `shared_isolated` gives one child per worker process and configuration,
which is what Ray task pools want.

Protocol: length-prefixed frames. A request is a pickle of ``(fn, kwargs)`` (the parent is
trusted); a reply is JSON (the child handles hostile bytes, so the parent never unpickles what
it sends), optionally followed by one binary payload: a function may return
``{"payload": bytes | numpy array, ...}`` and the array's bytes travel raw (mp4 bytes or
decoded frames without base64 or pickle).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any

_LEN = struct.Struct(">Q")
FAILURES = ("timeout", "crashed", "out_of_memory", "error")


class IsolatedError(Exception):
    """A call that did not return: `reason` is one of FAILURES."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def exit_detail(code: int | None) -> str:
    """A child's exit code in words: -11 -> 'killed by SIGSEGV'."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# ----- the child ------------------------------------------------------------------------------
def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _write_frame(fd: int, data: bytes | memoryview) -> None:
    os.write(fd, _LEN.pack(len(data)))
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _resolve(name: str):
    module, _, attr = name.partition(":")
    if not module.startswith(("data.", "pipeline.")) or not attr:
        raise ValueError(f"not a project function: {name!r}")
    return getattr(importlib.import_module(module), attr)


def _reply(result: Any) -> tuple[dict, bytes | memoryview | None]:
    """A function's result -> (JSON header, raw payload or None)."""
    if not (isinstance(result, dict) and "payload" in result):
        return {"ok": result}, None
    import numpy as np  # lazy: the child imports numpy only after its limits and thread env are set

    rest = {k: v for k, v in result.items() if k != "payload"}
    p = result["payload"]
    if isinstance(p, np.ndarray):
        p = np.ascontiguousarray(p)
        return ({"ok": rest, "payload": {"dtype": p.dtype.str, "shape": list(p.shape)}},
                memoryview(p).cast("B"))
    return {"ok": rest, "payload": {"bytes": True}}, bytes(p)


def _serve(in_fd: int, out_fd: int) -> None:
    _write_frame(out_fd, b'{"ready": true}')
    while True:
        head = _read_exact(in_fd, _LEN.size)
        if head is None:
            return  # the parent closed the pipe
        fn, kwargs = pickle.loads(_read_exact(in_fd, _LEN.unpack(head)[0]) or b"")
        payload = None
        try:
            header, payload = _reply(_resolve(fn)(**kwargs))
        except MemoryError:
            header = {"error": ["out_of_memory", "MemoryError"]}
        except Exception as e:  # noqa: BLE001 - a failing call must not end the child
            header = {"error": ["error", f"{type(e).__name__}: {e}"[:1000]]}
        _write_frame(out_fd, json.dumps(header).encode())
        if payload is not None:
            _write_frame(out_fd, payload)


def _watch_parent() -> None:
    """Exit when the parent dies, even while the main thread is stuck in a blocking call."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _child_main(cfg_json: str) -> None:
    import resource

    cfg = json.loads(cfg_json)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # The protocol gets its own fds; anything a library prints to stdout goes to stderr.
    in_fd, out_fd = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    _watch_parent()
    for name in cfg["preload"]:  # imports before the memory cap and before "ready"
        importlib.import_module(name)
    try:
        import av.logging

        av.logging.set_level(None)  # FFmpeg's complaints about bad files are expected here
    except ImportError:
        pass
    if cfg["max_memory_mb"]:
        limit = cfg["max_memory_mb"] * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _serve(in_fd, out_fd)


# ----- the parent side --------------------------------------------------------------------------
class Isolated:
    """A reusable child process running project functions with a timeout per call.

    `call(fn, kwargs, timeout_s)` returns the function's result or raises IsolatedError; it
    restarts the child after a timeout or a crash. Use as a context manager, or `close()`."""

    def __init__(self, max_memory_mb: int = 4096, startup_timeout_s: float = 60.0,
                 preload: tuple[str, ...] = ()):
        self.max_memory_mb = max_memory_mb
        self.startup_timeout_s = startup_timeout_s
        self.preload = tuple(preload)
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self.starts = 0  # children started: 1 + restarts after timeouts and crashes
        self._lock = threading.Lock()

    def __enter__(self) -> Isolated:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def call(self, fn: str, kwargs: dict, timeout_s: float) -> Any:
        """Run ``fn(**kwargs)`` in the child; its result, with a payload put back under
        "payload" (bytes, or a numpy array)."""
        with self._lock:  # one request at a time on the pipe (Ray may run tasks in threads)
            self._ensure_started()
            deadline = time.monotonic() + timeout_s
            try:
                self._send(pickle.dumps((fn, kwargs), protocol=pickle.HIGHEST_PROTOCOL))
                header = json.loads(self._read_frame(deadline))
                payload = self._read_frame(deadline) if "payload" in header else None
            except TimeoutError:
                self._kill()
                raise IsolatedError("timeout", f"no answer in {timeout_s:.3g}s") from None
            except (BrokenPipeError, EOFError):
                code = self._kill()
                raise IsolatedError("crashed", exit_detail(code)) from None
        if "error" in header:
            raise IsolatedError(*header["error"])
        result = header["ok"]
        if payload is not None:
            meta = header["payload"]
            if meta.get("bytes"):
                result["payload"] = payload
            else:
                import numpy as np  # lazy: see _reply

                result["payload"] = np.frombuffer(payload, np.dtype(meta["dtype"])).reshape(
                    meta["shape"])
        return result

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._kill()

    # internals
    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._kill()  # died between calls (e.g. the OOM killer): not the next call's fault
        if self._proc is not None:
            return
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # Fewer malloc arenas: each reserves 64 MB of address space, which RLIMIT_AS counts.
        env.setdefault("MALLOC_ARENA_MAX", "2")
        cfg = {"max_memory_mb": self.max_memory_mb, "preload": list(self.preload)}
        self._proc = subprocess.Popen([sys.executable, "-m", "data.isolate", json.dumps(cfg)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._buf = b""
        self.starts += 1
        try:
            ready = self._read_frame(time.monotonic() + self.startup_timeout_s)
        except (TimeoutError, EOFError) as e:
            code = self._kill()
            raise RuntimeError(f"the isolated worker did not start ({exit_detail(code)}): "
                               f"{e!r}") from e
        assert json.loads(ready) == {"ready": True}, ready

    def _send(self, data: bytes) -> None:
        self._proc.stdin.write(_LEN.pack(len(data)) + data)
        self._proc.stdin.flush()

    def _read_frame(self, deadline: float) -> bytes:
        head = self._read(_LEN.size, deadline)
        return self._read(_LEN.unpack(head)[0], deadline)

    def _read(self, n: int, deadline: float) -> bytes:
        fd = self._proc.stdout.fileno()
        chunks, have = [self._buf], len(self._buf)
        while have < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._buf = b"".join(chunks)
                raise TimeoutError
            chunk = os.read(fd, max(1 << 16, min(n - have, 1 << 24)))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            have += len(chunk)
        data = b"".join(chunks)
        self._buf = data[n:]
        return data[:n]

    def _kill(self) -> int | None:
        """Kill the child (if alive) and forget it; the next call starts a new one."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
            try:  # a child stuck in uninterruptible I/O may not die at once: do not wait on it
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        return proc.returncode


@functools.lru_cache(maxsize=8)
def _shared(max_memory_mb: int, startup_timeout_s: float, preload: tuple[str, ...]) -> Isolated:
    import atexit

    worker = Isolated(max_memory_mb, startup_timeout_s, preload)
    atexit.register(worker.close)
    return worker


def shared_isolated(max_memory_mb: int = 4096, startup_timeout_s: float = 60.0,
                    preload: tuple[str, ...] = ()) -> Isolated:
    """One child per process and configuration, kept for the life of the process: Ray reuses
    worker processes across tasks, so a task pool pays the child's start once per worker.
    (The one deliberate per-process cache in the project.)"""
    return _shared(int(max_memory_mb), float(startup_timeout_s), tuple(preload))


if __name__ == "__main__":
    _child_main(sys.argv[1])
