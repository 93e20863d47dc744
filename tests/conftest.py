"""Shared test fixtures."""

import contextlib
import functools
import http.server
import json
import threading

import pytest
import ray
import torch

from training.prebuild import use_venv_ninja

use_venv_ninja()  # in-process DeepSpeed builds its ops with the ninja the workers use


def forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals (``deepspeed.utils.groups``); a test
    that builds an engine in the pytest process after another one destroyed its process group
    would find the dead group there. Drop the cached ones (workers have one group per process)."""
    import deepspeed.utils.groups as groups  # lazy: deepspeed import ~1.2 s, only for such tests

    groups._WORLD_GROUP = None
    groups.mesh_device = None


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest single-threaded, and the CI machine's 2 cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of 2 CPUs for one test module."""
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_with_state_api():
    """A local Ray of 2 CPUs with its dashboard, which `ray.util.state` (listing actors and
    workers, e.g. to kill one) needs."""
    ray.init(num_cpus=2, dashboard_host="127.0.0.1", include_dashboard=True, configure_logging=False)
    yield
    ray.shutdown()


class Recorder:
    """Toy graph stages that record each execution and can be told to crash: each writes a
    partial file first, then a file holding its config and its inputs' files (and, with
    `blob`, a binary file in a subdirectory) and, with `log`, logs one metric."""

    def __init__(self, blob: bool = False, log: bool = True):
        self.calls: list[str] = []
        self.crash: set[str] = set()
        self.blob, self.log = blob, log

    def stage(self, name):
        def fn(ctx):
            self.calls.append(name)
            (ctx.out_dir / "partial.txt").write_text("half")
            if name in self.crash:
                raise RuntimeError(f"{name} exploded")
            upstream = {k: (v / "out.txt").read_text() for k, v in ctx.inputs.items()}
            if self.blob:
                (ctx.out_dir / "sub").mkdir(exist_ok=True)
                (ctx.out_dir / "sub" / "out.bin").write_bytes(bytes(range(256)) * 4)
            (ctx.out_dir / "out.txt").write_text(json.dumps({"cfg": ctx.hashed_config, "up": upstream}))
            if self.log:
                ctx.tracker.log({f"{name}/value": 1.0})
            return {"ok": True}

        return fn


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """A static-file handler that does not log each request to stderr."""

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_http(handler, directory=None):
    """A real HTTP server on 127.0.0.1 in a thread -> its base URL. `handler`: a
    BaseHTTPRequestHandler class; with `directory`, a SimpleHTTPRequestHandler serving it."""
    if directory is not None:
        handler = functools.partial(handler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
