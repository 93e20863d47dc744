"""The Samples section: the grid of all prompts, one card per sample (video, prompt, its numbers
and probe badges), and the grid of each checkpoint."""

from __future__ import annotations

from pathlib import Path

from pipeline.report.load import _finite
from pipeline.report.markup import _badge, _note, esc, fmt
from pipeline.report.page import Page
from pipeline.report.results import _probe_matches, _sample_checks, eval_stages, final_samples, probe_rows


def samples(page: Page) -> str:
    parts = ["<section id='samples'><h2>Samples</h2>"]
    any_video = False
    for s in eval_stages(page.run) or [x for x in page.run.stages if x.videos]:
        res = s.results or {}
        samples = final_samples(res) or [  # else what the tracker saw
            {"prompt": v.get("caption", ""), "path": v.get("path")} for v in s.videos
            if not str(v.get("path", "")).endswith("grid.mp4")]
        grid = s.dir / str(res.get("grid") or "samples/grid.mp4")
        if grid.exists():
            parts.append(f"<div class='grid-video'><h3>All prompts "
                         f"({esc(s.name)}/{esc(page.rel_to(grid, s.dir))})</h3>"
                         f"{page.video(grid, 'grid')}</div>")
            any_video = True
        probes = probe_rows(res)
        cards = []
        for i, smp in enumerate(samples):
            path = Path(str(smp.get("path") or ""))
            path = path if path.is_absolute() else s.dir / path
            prompt = str(smp.get("prompt") or smp.get("caption") or "")
            checks = [(p["name"], p["passed"]) for p in probes
                      if _probe_matches(p, i, smp, prompt)] + _sample_checks(smp)
            badges = "".join(f"<span class='probe'>{esc(n)} {_badge(ok)}</span>"
                             for n, ok in checks)
            nums = "".join(f"<span class='step'>{esc(k)} {esc(fmt(v))}</span>"
                           for k, v in smp.items() if k != "index" and _finite(v))
            cards.append(f"<div class='card'>{page.video(path, prompt)}<p class='prompt'>"
                         f"{esc(prompt)}</p>{nums}{badges}</div>")
        if cards:
            any_video = True
            parts.append(f"<div class='cards'>{''.join(cards)}</div>")
        grids = [(ck["step"], s.dir / str(ck["grid"])) for ck in res.get("checkpoints") or []
                 if isinstance(ck, dict) and ck.get("grid") and "step" in ck]
        if len(grids) > 1:
            parts.append("<h3>Over training steps</h3><div class='cards'>" + "".join(
                f"<div class='card'>{page.video(g, f'step {st}')}<p class='prompt'>step "
                f"{esc(fmt(st))}</p></div>" for st, g in grids) + "</div>")
    if not any_video:
        parts.append(_note("No sampled videos recorded."))
    return "".join(parts) + "</section>"
