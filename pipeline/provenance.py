"""A run's identity and the code it ran: the run id, and the checkout's commit with a digest of
its uncommitted changes, recorded in every run's lineage so a run can be replayed
(`spacetime submit --replay`) only on the code it ran. Used by both the local CLI
(`pipeline.cli`) and the cluster client (`pipeline.submit`).
"""

from __future__ import annotations

import hashlib
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def _git(*args: str, repo: Path = REPO) -> bytes:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=30)
    if r.returncode != 0:
        raise OSError(r.stderr.decode(errors="replace").strip())
    return r.stdout


def git_state(repo: Path = REPO) -> dict[str, Any]:
    """The submitter's commit and what of the shipped tree differs from it.

    `changed` lists tracked files that differ from HEAD and untracked files that are not
    ignored (both ship with the working dir); `diff_sha256` is a digest of exactly those
    changes (the diff against HEAD plus the untracked files' contents), so two runs can be
    told apart without storing the diff itself (it may contain anything).
    """
    try:
        commit = _git("rev-parse", "HEAD", repo=repo).decode().strip()
        tracked = _git("diff", "HEAD", "--name-only", "-z", repo=repo).decode().split("\0")
        untracked = _git("ls-files", "--others", "--exclude-standard", "-z",
                         repo=repo).decode().split("\0")
        tracked, untracked = [f for f in tracked if f], [f for f in untracked if f]
        h = hashlib.sha256(_git("diff", "HEAD", "--binary", repo=repo))
        for f in sorted(untracked):
            p = repo / f
            if p.is_file():
                h.update(f.encode() + b"\0" + p.read_bytes())
    except (OSError, subprocess.SubprocessError) as e:
        return {"commit": None, "dirty": None, "error": str(e)[:200]}
    changed = sorted(set(tracked) | set(untracked))
    return {"commit": commit, "dirty": bool(changed), "changed": changed[:100],
            "changed_count": len(changed), "diff_sha256": h.hexdigest() if changed else None}


def git_commit(repo: Path) -> dict:
    """`git_state` of `repo`, or nulls where it is not a checkout (e.g. a submitted job's
    shipped working directory)."""
    if not (repo / ".git").exists():
        return {"commit": None, "dirty": None}
    return git_state(repo)
