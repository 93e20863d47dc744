"""Build DeepSpeed's native ops once, at install time, instead of on first use in a run.

DeepSpeed compiles some of its C++ ops just in time (torch's cpp_extension, cached in
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``): on CPU workers the
shared-memory allreduce every ZeRO run loads (``ShareMemCommBuilder``) and the CPU Adam that
ZeRO-Offload steps with (``CPUAdamBuilder``). Each takes tens of seconds to compile, which a
fresh machine would otherwise pay inside its first training run. ``make`` runs this after
installing the project; it builds the ops this machine's accelerator can use and skips the
others (on a GPU node the CPU-only shared-memory op is not offered).

The cache is only reused by processes that build with the same ``ninja``: Debian's 1.11 and
pip's 1.13 (a DeepSpeed dependency) each discard the other's build log, and a missing log
entry means "rebuild". torch runs whichever ``ninja`` PATH finds, so ``use_venv_ninja`` puts
the one installed beside this interpreter first; the CLI, every training worker and this
script call it (and ``make`` puts the venv's bin first on PATH for everything it runs).

    python -m training.prebuild
"""

from __future__ import annotations

import os
import sysconfig
import time

OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def use_venv_ninja() -> None:
    """Put this interpreter's scripts directory (the venv's bin) first on PATH when it holds a
    ``ninja``, so DeepSpeed's op builds in this process and its children use that one."""
    scripts = sysconfig.get_path("scripts")
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(scripts, "ninja")) and path.split(os.pathsep)[0] != scripts:
        os.environ["PATH"] = os.pathsep.join([scripts, path]) if path else scripts


def prebuild(ops: tuple[str, ...] = OPS) -> dict[str, str]:
    """Build (or load from the cache) each op -> {op: "ready in N s" | why it was skipped}."""
    import deepspeed.ops  # lazy: deepspeed ~2.7 s to import, needed only here
    from deepspeed.accelerator import get_accelerator

    use_venv_ninja()
    out = {}
    for name in ops:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            out[name] = f"skipped: not offered by the {get_accelerator().device_name()} accelerator"
            continue
        t0 = time.time()
        builder.load(verbose=False)
        out[name] = f"ready in {time.time() - t0:.1f}s"
    return out


def main() -> None:
    for name, what in prebuild().items():
        print(f"deepspeed op {name}: {what}", flush=True)


if __name__ == "__main__":
    main()
