"""The whole document: the sections in order under a header with their links, the inline CSS
and the few lines of JavaScript; :func:`write_report` writes it (atomically) as report.html."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from pipeline.report.load import load_run
from pipeline.report.markup import esc, fmt_time
from pipeline.report.page import Page, ReportConfig
from pipeline.report.sections.consistency import consistency
from pipeline.report.sections.curation import curation
from pipeline.report.sections.evaluation import evaluation
from pipeline.report.sections.lineage import lineage
from pipeline.report.sections.run import header
from pipeline.report.sections.samples import samples
from pipeline.report.sections.training import training


def render(page: Page) -> str:
    sections = [header(page), curation(page), training(page), evaluation(page),
                consistency(page), samples(page), lineage(page)]
    nav = "".join(f"<a href='#{k}'>{k.title()}</a>" for k in
                  ("run", "curation", "training", "evaluation", "consistency", "samples",
                   "lineage"))
    title = f"spacetime run {page.run.run_id}"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><nav>{nav}</nav></header><main>"
            f"{''.join(sections)}</main><footer>Written by <code>spacetime report</code> "
            f"at {esc(fmt_time(time.time()))} from the files under {esc(str(page.run.root))}."
            f"</footer><script>{JS}</script></body></html>")


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f2937;color:#fff;padding:12px 24px;position:sticky;top:0;z-index:1}
header h1{margin:0;font-size:18px}
nav a{color:#cbd5e1;margin-right:16px;text-decoration:none}
main{padding:0 24px 24px}
section{background:#fff;border:1px solid #e5e7eb;border-radius:6px;margin:16px 0;
        padding:8px 16px 16px}
h2{font-size:17px;border-bottom:1px solid #eee;padding-bottom:4px}
h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0}
td,th{padding:3px 8px;text-align:left;vertical-align:top}
table.kv th{color:#555;font-weight:500}
table.grid td,table.grid th{border:1px solid #e5e7eb}
table.grid th{background:#f3f4f6}
td.detail{max-width:520px;word-break:break-all;font-size:12px;color:#555}
td.other{background:#fff4e5}
.cols{display:flex;gap:32px;flex-wrap:wrap;align-items:flex-start}
.multiples{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:6px 0}
figcaption{font-weight:600;margin-bottom:2px}
svg.chart{display:block;background:#fff}
svg.chart text{font-size:11px;fill:#444}
svg.chart .label{fill:#777}
svg.chart .grid{stroke:#eee}
svg.chart .axis,svg.chart .tick{stroke:#999}
svg.chart .line{stroke-width:1.6}
.legend span{margin-right:12px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
.note{color:#777;font-style:italic}
.error{color:#b91c1c}
.state{padding:1px 6px;border-radius:3px;background:#e5e7eb}
.state.done{background:#d1fae5}
.state.cached{background:#dbeafe}
.state.failed,.state.blocked{background:#fee2e2}
.cards{display:flex;flex-wrap:wrap;gap:14px}
.card{width:260px}
video{width:256px;background:#000;image-rendering:pixelated}
.grid-video video{width:512px}
.prompt{margin:4px 0}
.probe{display:inline-block;margin-right:6px;font-size:12px}
.badge{padding:0 5px;border-radius:3px;background:#e5e7eb;font-size:12px}
.badge.pass{background:#d1fae5;color:#065f46}
.badge.fail{background:#fee2e2;color:#991b1b}
.step{color:#555;font-size:12px;margin-right:6px}
pre{background:#f6f8fa;padding:8px;overflow:auto;max-height:360px;font-size:12px}
details{margin:6px 0}
details.stage{border-top:1px solid #eee;padding-top:4px}
summary{cursor:pointer}
footer{color:#888;font-size:12px;padding:0 24px 24px}
"""

# Marks each video loaded (data-state, data-width) or unplayable (and shows a link to the file).
JS = """
for (const v of document.querySelectorAll('video')) {
  const loaded = () => { v.dataset.state = 'loaded'; v.dataset.width = v.videoWidth; };
  const failed = () => { v.dataset.state = 'error'; const n = v.nextElementSibling;
                         if (n) n.hidden = false; };
  if (v.readyState >= 2) loaded(); else v.addEventListener('loadeddata', loaded);
  if (v.error) failed(); else v.addEventListener('error', failed);
}
"""


def write_report(root: str | Path, cfg: Optional[ReportConfig] = None) -> Path:
    """Write the run's report.html (default under runs/<run_id>/) and return its path."""
    cfg = cfg or ReportConfig()
    run = load_run(root, cfg.run_id)
    out = Path(cfg.out) if cfg.out else run.root / "runs" / run.run_id / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render(Page(run, cfg, out.parent))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
