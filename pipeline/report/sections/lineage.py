"""The Lineage section: per stage its hash, code version, state, the run that made it, times,
commit, host, versions, W&B ids, its inputs (hashes matched to the upstream stages), its
failure, and its hashed config and result."""

from __future__ import annotations

from pathlib import Path

from data.storage import INFO
from pipeline.report.load import _finite
from pipeline.report.markup import _kv_table, _note, _pre_json, esc, fmt_time
from pipeline.report.page import Page


def lineage(page: Page) -> str:
    parts = ["<section id='lineage'><h2>Lineage</h2>"]
    by_name = {s.name: s for s in page.run.stages}
    for s in page.run.stages:
        info = s.info
        rows = {"hash": s.record.get("hash", info.get("hash", "-")),
                "code version": info.get("version", "-"),
                "state in this run": s.record.get("state", "-"),
                "made by run": info.get("run_id", "-"),
                "started": fmt_time(info.get("started")),
                "duration": (f"{info['duration_s']:.1f} s"
                             if _finite(info.get("duration_s")) else "-"),
                "commit": ((info.get("git") or {}).get("commit") or "-")
                + (" (dirty)" if (info.get("git") or {}).get("dirty") else ""),
                "host": info.get("host", "-"),
                "excluded from hash": ", ".join(info.get("excluded_from_hash") or []) or "-",
                "versions": ", ".join(f"{k} {v}" for k, v in
                                      (info.get("versions") or {}).items() if v) or "-"}
        track = (info.get("result") or {}).get("tracking") or {}
        for k in ("wandb_id", "wandb_mode", "wandb_url"):
            if track.get(k):
                rows[k.replace("_", " ")] = track[k]
        inputs = []
        for name, path in (info.get("inputs") or s.record.get("upstream") or {}).items():
            h = (info.get("input_hashes") or {}).get(name)
            up = by_name.get(name)
            ok = up is not None and h is not None and up.record.get("hash") == h
            d = up.dir if up is not None else Path(path)
            inputs.append(f"<tr><td>{esc(name)}</td><td><a href='{esc(page.rel(d))}'>"
                          f"{esc(Path(path).name)}</a></td><td><code>{esc((h or '-')[:12])}"
                          f"</code>{' ✓' if ok else ''}</td></tr>")
        inp = (f"<table class='grid'><tr><th>input</th><th>directory</th><th>hash</th></tr>"
               f"{''.join(inputs)}</table>" if inputs else _note("no inputs"))
        fail = ""
        if s.failure and s.record.get("state") == "failed":
            fail = (f"<p class='error'>{esc(s.failure.get('error', ''))}</p>"
                    f"<details><summary>Traceback</summary><pre>"
                    f"{esc(s.failure.get('traceback', ''))}</pre></details>")
        missing = "" if s.info else _note(f"no {INFO} in {s.dir}")
        state = s.record.get("state", "-")
        parts.append(
            f"<details class='stage'{' open' if fail or missing else ''}><summary>"
            f"<b>{esc(s.name)}</b> <code>{esc(s.dir.name)}</code> <span class='state "
            f"{esc(state)}'>{esc(state)}</span> {esc(rows['duration'])}, commit "
            f"<code>{esc(rows['commit'][:10])}</code></summary>{missing}{fail}"
            f"<div class='cols'>{_kv_table(rows)}{inp}</div>"
            f"<details><summary>Hashed config</summary>{_pre_json(info.get('config', {}))}"
            f"</details><details><summary>Result</summary>"
            f"{_pre_json(info.get('result', s.record.get('result', {})))}</details></details>")
    return "".join(parts) + "</section>"
