"""Ingest: turn the configured inputs into a list of items, exclude blocklisted ones, and
bring remote files to local disk for probing and decoding.

Inputs (`IngestConfig.inputs`), each one of:
- a local directory or an fsspec URL of one (`s3://bucket/raw/`, `gs://...`, `memory://...`):
  every file whose extension is in `extensions`, recursively unless `recursive=False`; a
  same-named `.txt` beside a video is its caption;
- a glob (`/data/*/clips/*.mp4`, `s3://bucket/2024-*/*.mkv`), or one file (path or URL);
- a manifest (`.csv`, `.parquet`, `.jsonl`, optionally `.gz` for the text ones), local or
  remote, one row per video: `path_column` (required), `caption_column`, `license_column`,
  `source_url_column` (optional), and every other column carried as metadata to the shards.
  A path with a scheme is a URL, an absolute path is local, anything else is relative to the
  manifest's own location (so a manifest travels with its bucket).

An item is `{"id", "url", "caption", "license", "source_url", "meta"}`. `url` is the resolved
location: an absolute path for local files, a full URL otherwise. `id` is a readable stem
plus 12 hex digits of the sha1 of `url`: stable across runs and machines that see the same
URL, and unique among inputs (a URL listed twice is one item, first listing wins). Items come
out in input order, each input's files sorted, so the same inputs give the same list.

Listing never reads video bytes: a bucket of millions of files stays a listing on the driver.
Reading happens per item on the workers (`fetch_item`): the download, the optional sha256,
and the blocklist's hash rule, which needs the bytes.

The blocklist (`BlocklistConfig`, inline lists and/or a JSON/YAML file at a path or URL)
excludes an item with a reason:
- `opted_out`: its `source_url` or `url` is under an opted-out source: a domain (also
  matching its subdomains), a `domain/path` or `scheme://` URL prefix, or a local path prefix;
- `license_not_allowed`: its licence is listed in `licenses`, or `allowed_licenses` is set
  and its licence (possibly missing) is not in it. Licences compare case- and
  separator-insensitively ("CC BY-NC 4.0" == "cc-by-nc-4.0");
- `blocked_hash`: the sha256 of its bytes is listed in `sha256`.
Listing or manifest errors (a missing input, a manifest without the path column) are
configuration errors and raise before any work starts; everything about a single file is a
reject with a reason.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urlsplit

from data.checks import check_ranges

VIDEO_EXTENSIONS = [".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"]
MANIFEST_SUFFIXES = (".csv", ".csv.gz", ".jsonl", ".jsonl.gz", ".parquet")
REASONS = ("opted_out", "license_not_allowed", "blocked_hash", "fetch_failed", "too_large")


@dataclass
class BlocklistConfig:
    """Opt-outs and exclusions; `path` (JSON or YAML, local or URL) adds to the inline lists."""

    path: Optional[str] = None
    sources: list[str] = field(default_factory=list)  # domains, URL prefixes, path prefixes
    sha256: list[str] = field(default_factory=list)  # hex digests of excluded files
    licenses: list[str] = field(default_factory=list)  # licences not allowed
    allowed_licenses: Optional[list[str]] = None  # if set, only these (a missing one fails)

    def build(self, storage_options: dict | None = None) -> Blocklist:
        lists = {"sources": list(self.sources), "sha256": list(self.sha256),
                 "licenses": list(self.licenses),
                 "allowed_licenses": None if self.allowed_licenses is None
                 else list(self.allowed_licenses)}
        if self.path:
            import fsspec
            import yaml

            with fsspec.open(self.path, "rt", **(storage_options or {})) as f:
                loaded = yaml.safe_load(f) or {}  # YAML reads JSON too
            unknown = set(loaded) - set(lists)
            if unknown:
                raise ValueError(f"blocklist {self.path}: unknown keys {sorted(unknown)}; "
                                 f"known: {sorted(lists)}")
            for k, v in loaded.items():
                if k == "allowed_licenses" and lists[k] is None:
                    lists[k] = list(v)
                else:
                    lists[k] = (lists[k] or []) + list(v)
        return Blocklist(**lists)


@dataclass
class IngestConfig:
    inputs: list[str] = field(default_factory=list)  # dirs, globs, files, URLs, manifests
    extensions: list[str] = field(default_factory=lambda: list(VIDEO_EXTENSIONS))
    recursive: bool = True
    sidecar_captions: bool = True  # directory inputs: <name>.txt beside <name>.mp4
    path_column: str = "path"
    caption_column: str = "caption"
    license_column: str = "license"
    source_url_column: str = "source_url"
    default_license: Optional[str] = None  # for items without one (directories, empty cells)
    blocklist: BlocklistConfig = field(default_factory=BlocklistConfig)
    hash_files: bool = False  # sha256 every file (always done when the blocklist lists hashes)
    storage_options: dict[str, Any] = field(default_factory=dict)  # passed to fsspec
    fetch_retries: int = 3  # retries of a transient fetch failure (5xx, reset, timeout)
    fetch_backoff_s: float = 1.0  # the first retry's wait; doubles with each retry

    def __post_init__(self) -> None:
        check_ranges(self, fetch_retries=">= 0", fetch_backoff_s=">= 0")


# ----- the blocklist ------------------------------------------------------------------------
def normalize_license(name: str | None) -> str:
    """'CC BY-NC 4.0' -> 'cc-by-nc-4.0'; None -> ''."""
    return re.sub(r"[\s_\-]+", "-", (name or "").strip().casefold()).strip("-")


class Blocklist:
    """The loaded, indexed form of a BlocklistConfig: lookups cost O(URL length), not
    O(entries), so a blocklist of many domains stays cheap on millions of items."""

    def __init__(self, sources=(), sha256=(), licenses=(), allowed_licenses=None):
        self.domains: set[str] = set()
        self.prefixes: dict[str, list[str]] = {}  # host ("" for local paths) -> URL prefixes
        for entry in sources:
            e = str(entry).strip().lower()
            if not e:
                continue
            if "://" in e or e.startswith("/"):
                self.prefixes.setdefault(_host(e), []).append(e)
            elif "/" in e:  # domain/path: same as an http(s) URL prefix, either scheme
                self.prefixes.setdefault(e.split("/", 1)[0], []).append(e)
            else:
                self.domains.add(e.lstrip("."))
        self.sha256 = {str(h).strip().lower().removeprefix("sha256:") for h in sha256}
        self.licenses = {normalize_license(x) for x in licenses}
        self.allowed = None if allowed_licenses is None else {
            normalize_license(x) for x in allowed_licenses}

    def opted_out(self, url: str | None) -> str | None:
        """The entry that opts `url` out, or None."""
        if not url:
            return None
        low = url.strip().lower()
        host = _host(low)
        labels = host.split(".") if host else []
        for i in range(len(labels)):  # example.com matches www.example.com
            if ".".join(labels[i:]) in self.domains:
                return ".".join(labels[i:])
        hostpath = host + urlsplit(low).path if "://" in low else low
        for p in self.prefixes.get(host, ()):
            if low.startswith(p) or ("://" not in p and hostpath.startswith(p)):
                return p
        return None


def _host(url: str) -> str:
    return (urlsplit(url).hostname or "") if "://" in url else ""


def check_blocklist(item: dict, blocklist: Blocklist) -> tuple[str, str] | None:
    """-> (reason, detail) if the blocklist excludes `item`, else None. The hash rule applies
    only once `item["sha256"]` is known (see `fetch_item`)."""
    for key in ("source_url", "url"):
        hit = blocklist.opted_out(item.get(key))
        if hit:
            return "opted_out", f"{key} {item[key]} matches {hit!r}"
    lic = normalize_license(item.get("license"))
    if lic and lic in blocklist.licenses:
        return "license_not_allowed", f"licence {item['license']!r} is blocked"
    if blocklist.allowed is not None and lic not in blocklist.allowed:
        return "license_not_allowed", (f"licence {item.get('license')!r} not in allowed "
                                       f"{sorted(blocklist.allowed)}")
    digest = item.get("sha256")
    if digest and digest.lower() in blocklist.sha256:
        return "blocked_hash", f"sha256 {digest}"
    return None


# ----- listing ------------------------------------------------------------------------------
def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def _canonical(fs, path: str) -> str:
    return os.path.abspath(path) if _is_local(fs) else fs.unstrip_protocol(path)


def _url_to_fs(url: str, storage_options: dict):
    from fsspec.core import url_to_fs

    return url_to_fs(url, **storage_options)


def make_id(url: str) -> str:
    """Readable and stable: '<stem>-<12 hex of sha1(url)>'."""
    stem = os.path.splitext(posixpath.basename(urlsplit(url).path if "://" in url else url))[0]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:40].strip("._") or "video"
    return f"{slug}-{hashlib.sha1(url.encode()).hexdigest()[:12]}"


def _is_manifest(url: str) -> bool:
    path = urlsplit(url).path if "://" in url else url
    return path.lower().endswith(MANIFEST_SUFFIXES)


def _jsonable(v: Any) -> Any:
    """Manifest cells as JSON values: NaN -> None, numpy/arrow scalars -> Python, dates -> str."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return None if math.isnan(v) else v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item"):  # numpy scalar
        return _jsonable(v.item())
    return str(v)


def _read_manifest(url: str, storage_options: dict) -> list[dict]:
    import fsspec

    low = (urlsplit(url).path if "://" in url else url).lower()
    if low.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fsspec.open(url, "rb", **storage_options) as f:
            return pq.read_table(f).to_pylist()
    with fsspec.open(url, "rt", encoding="utf-8", newline="", compression="infer",
                     **storage_options) as f:
        text = f.read()
    if low.endswith((".csv", ".csv.gz")):
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"manifest {url} line {n}: {e}") from e
    return rows


def _manifest_items(url: str, cfg: IngestConfig) -> list[dict]:
    rows = _read_manifest(url, cfg.storage_options)
    fs, mpath = _url_to_fs(url, cfg.storage_options)
    local = _is_local(fs)
    base = os.path.dirname(os.path.abspath(mpath)) if local else url.rsplit("/", 1)[0]
    known = {cfg.path_column, cfg.caption_column, cfg.license_column, cfg.source_url_column}
    items = []
    for n, row in enumerate(rows, 1):
        p = row.get(cfg.path_column)
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"manifest {url} row {n}: no '{cfg.path_column}' "
                             f"(columns: {sorted(row)})")
        p = p.strip()
        if "://" in p:
            rfs, rpath = _url_to_fs(p, cfg.storage_options)
            resolved = _canonical(rfs, rpath)
        elif os.path.isabs(p):
            resolved = os.path.normpath(p)
        else:
            resolved = os.path.normpath(os.path.join(base, p)) if local else f"{base}/{p}"

        def cell(col: str) -> str | None:
            v = _jsonable(row.get(col))
            return None if v is None or v == "" else str(v)

        items.append({
            "url": resolved,
            "caption": cell(cfg.caption_column) or "",
            "license": cell(cfg.license_column) or cfg.default_license,
            "source_url": cell(cfg.source_url_column),
            "meta": {k: _jsonable(v) for k, v in row.items() if k not in known},
        })
    return items


def _listing_items(spec: str, cfg: IngestConfig) -> list[dict]:
    fs, path = _url_to_fs(spec, cfg.storage_options)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in cfg.extensions)
    is_http = spec.startswith(("http://", "https://"))
    if not is_http and any(c in path for c in "*?["):
        found = fs.glob(path, detail=True)
    elif not path.lower().endswith(exts) and fs.isdir(path):
        found = (fs.find(path, detail=True) if cfg.recursive
                 else {e["name"]: e for e in fs.ls(path, detail=True)})
    elif fs.exists(path):  # one file (named with a video extension: no directory probe)
        return [{"url": _canonical(fs, path), "caption": _sidecar(fs, path, None, cfg),
                 "license": cfg.default_license, "source_url": None, "meta": {}}]
    else:
        raise FileNotFoundError(f"ingest input not found: {spec}")
    files = sorted(name for name, info in found.items() if info.get("type") != "directory")
    present = set(files)
    return [{"url": _canonical(fs, f), "caption": _sidecar(fs, f, present, cfg),
             "license": cfg.default_license, "source_url": None, "meta": {}}
            for f in files if f.lower().endswith(exts)]


def _sidecar(fs, path: str, present: set[str] | None, cfg: IngestConfig) -> str:
    if not cfg.sidecar_captions:
        return ""
    txt = posixpath.splitext(path)[0] + ".txt"
    if present is not None and txt not in present:
        return ""
    try:
        return fs.cat_file(txt).decode("utf-8", errors="replace").strip()
    except (FileNotFoundError, IsADirectoryError):
        return ""


def list_inputs(cfg: IngestConfig) -> list[dict]:
    """All items of all inputs, deduplicated by URL, in a deterministic order.

    Raises (a configuration error, before any work) for a missing input, an input that
    yields no files, or a manifest row without a path."""
    items: list[dict] = []
    seen: set[str] = set()
    if not cfg.inputs:
        raise ValueError("ingest.inputs is empty")
    for spec in cfg.inputs:
        found = _manifest_items(spec, cfg) if _is_manifest(spec) else _listing_items(spec, cfg)
        if not found:
            raise ValueError(f"ingest input {spec} holds no files with extensions "
                             f"{list(cfg.extensions)}")
        for it in found:
            if it["url"] not in seen:
                seen.add(it["url"])
                items.append({"id": make_id(it["url"]), **it})
    return items


# ----- on the worker: bytes -----------------------------------------------------------------
class FetchError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def fetch(url: str, cache_dir: str | os.PathLike, *, max_bytes: int | None = None,
          storage_options: dict | None = None, retries: int = 3,
          backoff_s: float = 1.0) -> str:
    """A local path holding `url`'s bytes. Local paths (and file:// URLs) are returned as
    they are; remote ones are downloaded once into `cache_dir` (named by the URL's hash,
    written to a temporary name and renamed, so a crash never leaves a partial file that
    looks complete). A transient failure (a 5xx, a reset connection, a timeout: see
    `pipeline.retry`) is retried up to `retries` times with exponential backoff from
    `backoff_s`; a permanent one (404, 403) is not. Raises FetchError("too_large" |
    "fetch_failed")."""
    from pipeline.retry import describe, is_transient, retry

    if not is_remote(url):
        return url.removeprefix("file://")
    os.makedirs(cache_dir, exist_ok=True)
    ext = posixpath.splitext(urlsplit(url).path)[1][:8]
    dest = os.path.join(os.fspath(cache_dir), hashlib.sha1(url.encode()).hexdigest() + ext)
    if os.path.exists(dest):
        return dest
    tmp = f"{dest}.{os.getpid()}.part"

    def attempt() -> str:
        fs, path = _url_to_fs(url, storage_options or {})
        size = fs.size(path)  # may be None (an HTTP server without Content-Length)
        if max_bytes is not None and size is not None and size > max_bytes:
            raise FetchError("too_large", f"{size} bytes > {max_bytes}")
        copied = 0
        with fs.open(path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                copied += len(chunk)
                if max_bytes is not None and copied > max_bytes:
                    raise FetchError("too_large", f"more than {max_bytes} bytes")
                dst.write(chunk)
        os.replace(tmp, dest)
        return dest

    try:
        return retry(attempt, attempts=retries + 1, backoff_s=backoff_s)
    except FetchError:
        raise
    except Exception as e:  # noqa: BLE001 - any transport error is this file's problem
        tried = f" (after {retries + 1} attempts)" if is_transient(e) and retries else ""
        raise FetchError("fetch_failed", describe(e)[:300] + tried) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch_item(item: dict, cfg: IngestConfig, blocklist: Blocklist, cache_dir: str | os.PathLike,
               *, max_bytes: int | None = None) -> tuple[dict | None, tuple[str, str] | None]:
    """Everything ingest does for one item on a worker; never raises for a bad input.

    Checks the source and licence rules (free), fetches the bytes (remote only), hashes them
    when asked to or when the blocklist lists hashes, and checks the hash rule.
    -> (item + {"local_path", "sha256"?}, None) or (None, (reason, detail))."""
    hit = check_blocklist(item, blocklist)
    if hit:
        return None, hit
    try:
        local = fetch(item["url"], cache_dir, max_bytes=max_bytes,
                      storage_options=cfg.storage_options, retries=cfg.fetch_retries,
                      backoff_s=cfg.fetch_backoff_s)
    except FetchError as e:
        return None, (e.reason, e.detail)
    out = {**item, "local_path": local}
    if cfg.hash_files or blocklist.sha256:
        # Only regular files within the size cap are read here: a FIFO or a sparse 64 GiB
        # file is left to the probe, which refuses it in a child process with a timeout.
        try:
            st = os.stat(local)
        except OSError as e:
            return None, ("fetch_failed", f"stat: {e}")
        if max_bytes is not None and st.st_size > max_bytes:
            return None, ("too_large", f"{st.st_size} bytes > {max_bytes}")
        if stat.S_ISREG(st.st_mode):
            try:
                out["sha256"] = file_sha256(local)
            except OSError as e:
                return None, ("fetch_failed", f"read: {e}")
            hit = check_blocklist(out, blocklist)
            if hit:
                return None, hit
    return out, None
