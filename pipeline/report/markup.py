"""HTML pieces shared by the sections: escaping, number and time formatting, notes, key-value
tables, JSON blocks and pass/fail badges."""

from __future__ import annotations

import html
import json
import math
import time
from typing import Any

from pipeline.report.load import _finite


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == int(v) and abs(v) < 1e15:
            return f"{int(v):,}"
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def fmt_time(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if _finite(t) else "-"


def _note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def _kv_table(d: dict, cls: str = "kv") -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in d.items())
    return f'<table class="{cls}">{rows}</table>'


def _pre_json(obj: Any) -> str:
    return f"<pre>{esc(json.dumps(obj, indent=2, default=str))}</pre>"


def _badge(ok: Any) -> str:
    if ok is True:
        return "<span class='badge pass'>pass</span>"
    if ok is False:
        return "<span class='badge fail'>fail</span>"
    return "<span class='badge'>n/a</span>"
