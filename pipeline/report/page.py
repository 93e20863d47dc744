"""The page being built: the run, the report's config, and links and video tags relative to
the directory the HTML file is written to. The sections (:mod:`pipeline.report.sections`) take
it; :mod:`pipeline.report.document` puts them together."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.report.load import RunData
from pipeline.report.markup import _note, esc

EMBED_VIDEOS_MAX_BYTES = 8 << 20  # `spacetime report --embed-videos`: inline each video up to this


@dataclass
class ReportConfig:
    """What to report and how; ``spacetime report [RUN_ID] [--embed-videos]`` fills it."""

    run_id: Optional[str] = None  # None: the latest run under run.root
    out: Optional[str] = None  # default: <run.root>/runs/<run_id>/report.html
    embed_videos_max_bytes: int = 0  # videos up to this size go inline as data: URIs (0: none)
    max_points: int = 1500  # per plotted series; longer ones are thinned evenly (last kept)
    max_reject_rows: int = 50  # rows of the rejects manifest listed in the page


class Page:
    """One run's page as the sections see it; paths in it are relative to ``out_dir``."""

    def __init__(self, run: RunData, cfg: ReportConfig, out_dir: Path):
        self.run, self.cfg, self.out_dir = run, cfg, out_dir

    def rel(self, path: Path) -> str:
        return os.path.relpath(Path(path).absolute(), self.out_dir.absolute())

    def video(self, path: Path, label: str) -> str:
        if not path.exists():
            return _note(f"missing video file: {self.rel(path)}")
        href = self.rel(path)
        src = href
        if 0 < path.stat().st_size <= self.cfg.embed_videos_max_bytes:
            src = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
        return (f'<video controls muted loop playsinline preload="auto" src="{esc(src)}" '
                f'title="{esc(label)}"></video><p class="video-error" hidden>This browser could '
                f'not play the video; <a href="{esc(href)}">open the file</a>.</p>')

    @staticmethod
    def rel_to(path: Path, base: Path) -> str:
        return os.path.relpath(path, base)
