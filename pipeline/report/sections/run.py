"""The Run section: the run's header (status, times, commit, command, config summary, package
versions, the full config) and the table of its stages."""

from __future__ import annotations

from typing import Any

from pipeline.report.load import _finite
from pipeline.report.markup import _kv_table, _note, _pre_json, esc, fmt_time
from pipeline.report.page import Page

CONFIG_SUMMARY = ("run.name", "source.kind", "source.num_videos", "model.dit.preset",
                  "model.dit.attention", "model.text.kind", "train.steps",
                  "train.global_batch_size", "train.lr", "train.num_frames", "train.height",
                  "train.width", "train.precision", "deepspeed.zero_stage", "cluster.name",
                  "cluster.num_workers", "cluster.gpus_per_worker")


def _dotted(cfg: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def header(page: Page) -> str:
    lin = page.run.lineage
    git = lin.get("git") or {}
    commit = git.get("commit") or "unknown"
    meta = {
        "run id": page.run.run_id,
        "status": {True: "ok", False: "FAILED"}.get(lin.get("ok"), "unfinished"),
        "started": fmt_time(lin.get("started")),
        "finished": fmt_time(lin.get("finished")),
        "commit": commit + (" (dirty)" if git.get("dirty") else ""),
        "host": lin.get("host", "-"),
        "command": "spacetime run " + " ".join([*(lin.get("stage_flags") or []),
                                                *(lin.get("argv") or [])]),
        "run root": str(page.run.root),
    }
    config = lin.get("config") or {}
    summary = {k: _dotted(config, k) for k in CONFIG_SUMMARY}
    summary = {k: v for k, v in summary.items() if v is not None}
    versions = lin.get("versions") or {}
    return (f"<section id='run'><h2>Run</h2><div class='cols'>{_kv_table(meta)}"
            f"{_kv_table(summary) if summary else _note('no config recorded')}</div>"
            f"<details><summary>Package versions</summary>{_kv_table(versions)}</details>"
            f"<details><summary>Full resolved config</summary>{_pre_json(config)}</details>"
            f"{stages_table(page)}</section>")


def stages_table(page: Page) -> str:
    run_commit = (page.run.lineage.get("git") or {}).get("commit")
    rows = []
    for s in page.run.stages:
        rec = s.record
        state = rec.get("state", "-")
        dur = rec.get("duration_s", s.info.get("duration_s"))
        commit = (s.info.get("git") or {}).get("commit") or "-"
        cls = "other" if commit not in ("-", run_commit) else ""
        made_by = s.info.get("run_id")
        made = "" if made_by in (None, page.run.run_id) else f" (made by run {made_by})"
        rows.append(
            f"<tr><td>{esc(s.name)}</td><td><span class='state {esc(state)}'>{esc(state)}"
            f"</span>{esc(made)}</td><td><code>{esc(rec.get('hash', '')[:12])}</code></td>"
            f"<td>{esc(f'{dur:.1f} s' if _finite(dur) else '-')}</td>"
            f"<td><a href='{esc(page.rel(s.dir))}'>{esc(s.dir.name)}</a></td>"
            f"<td>{esc(', '.join(rec.get('upstream') or {}) or '-')}</td>"
            f"<td class='{cls}'><code>{esc(commit[:10])}</code></td></tr>")
    head = "".join(f"<th>{h}</th>" for h in
                   ("stage", "state", "hash", "duration", "output", "inputs", "commit"))
    return f"<h3>Stages</h3><table class='grid'><tr>{head}</tr>{''.join(rows)}</table>"
