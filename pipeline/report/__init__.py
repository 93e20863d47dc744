"""The run report: one static HTML page per run, built from the run's files alone.

``spacetime report`` writes ``<run.root>/runs/<run_id>/report.html``: the run header and its
stages, the curation funnel and rejects, score histograms, training curves, evaluation metrics
over steps, the sampled videos with their prompts, and each stage's lineage.

Design decisions:

- **Files only.** Everything is read from what the graph and the stages already write
  (``lineage.json``; per stage ``info.json``, ``_SUCCESS.json``/``_FAILED.json``,
  ``metrics.jsonl``, ``stats.json``, the parquet manifests, ``results.json``). No W&B, Ray or
  torch: a report can be made on a laptop from a copied run root.
- **Stages are recognised by what they wrote, not by their names**: ``stats.json`` means
  curation, stepped metrics mean curves, ``results.json`` means evaluation. A new stage shows
  up without touching this package; a missing piece becomes a note in the page, never an error.
- **Inline SVG charts drawn here**, inline CSS, and a few lines of JavaScript that only mark
  each video loaded or unplayable. Nothing is fetched: the page works offline, forever.
- **Videos by relative path** from the HTML file, so the page keeps working when the run root
  is copied or moved as a whole; ``embed_videos_max_bytes`` embeds small videos as ``data:``
  URIs instead, for a single portable file.
- **Stage directories are looked up under ``<root>/stages/`` first**: ``lineage.json`` records
  absolute paths, which are stale after a copy.
- **Credentials are redacted** (:mod:`data.redact`) from everything shown, also for runs
  whose files were written before redaction existed.
- **Repeated steps keep the last value**: a resumed training stage appends to the same
  ``metrics.jsonl`` and re-logs the steps after its checkpoint.

Modules, bottom up: ``load`` (reading a run root), ``markup`` (escaping, formatting, small
HTML pieces), ``charts`` (the SVG chart kit), ``results`` (what ``results.json`` means),
``page`` (the config; the page's links and video tags), ``sections/`` (one module per section
of the page) and ``document`` (the whole HTML document, and :func:`write_report`).
"""


from pipeline.report.charts import bar_chart, fmt_tick, histogram_chart, line_chart, nice_ticks, thin
from pipeline.report.document import write_report
from pipeline.report.load import ReportError, RunData, StageData, load_run
from pipeline.report.page import EMBED_VIDEOS_MAX_BYTES, ReportConfig
from pipeline.report.results import _sample_checks, probe_rows

__all__ = ["EMBED_VIDEOS_MAX_BYTES", "ReportConfig", "ReportError", "RunData", "StageData",
           "_sample_checks", "bar_chart", "fmt_tick", "histogram_chart", "line_chart", "load_run",
           "nice_ticks", "probe_rows", "thin", "write_report"]
