"""Ingest: turn the configured inputs into a list of items, exclude blocklisted ones, and
bring remote files to local disk for probing and decoding.

Inputs (`IngestConfig.inputs`), each one of:
- a local directory or an fsspec URL of one (`s3://bucket/raw/`, `gs://...`, `memory://...`):
  every file whose extension is in `extensions` (videos) or `image_extensions` (stills: jpg,
  jpeg, png, webp), recursively unless `recursive=False`; a same-named `.txt` beside a video
  or an image is its caption;
- a glob (`/data/*/clips/*.mp4`, `s3://bucket/2024-*/*.mkv`), or one file (path or URL);
- an image WebDataset shard (`.tar`, local or fsspec, or a glob of them), as LAION-style
  datasets ship: one item of kind "image" per sample (`key.jpg`/`.png`/`.webp` with `key.txt`
  or a `key.json` holding "caption" or "text"; its other fields ride along as metadata, its
  "url" as source_url), located by its member's byte range so the worker reads only that; a
  sample without an image is a reject `no_image`, one without a caption `no_caption` (unless
  `tar_require_caption=False`: kept with an empty caption). Its url is `<tar>#<member>`;
  unlike other remote inputs, a stage on another node cannot fetch such a member again;
- a manifest (`.csv`, `.parquet`, `.jsonl`, optionally `.gz` for the text ones), local or
  remote, one row per video: `path_column` (required), `caption_column`, `license_column`,
  `source_url_column` (optional), and every other column carried as metadata to the shards.
  A path with a scheme is a URL, an absolute path is local, anything else is relative to the
  manifest's own location (so a manifest travels with its bucket).

A remote manifest (http(s), s3, ...) is not trusted with the workers' disks or network
(`RemoteManifestConfig`): its entries resolve against its own URL, and one naming a local
path, a `file://` URL or another scheme is a reject (`not_allowed_scheme`), one naming
another host or bucket too (`not_allowed_host`), unless `ingest.remote_manifests` allows it.
Local manifests and the inputs themselves are the user's own and name anything.

Local files are identified by their resolved path (symlinks followed), so a file reached
through a symlink and directly is one item. Directory listings do not follow symlinked
directories. What a listing cannot read is recorded, never fatal for the other files: an
unreadable sidecar caption makes its video a reject (`sidecar_unreadable`), a directory
named like a video one too (`not_a_file`), and an unreadable subdirectory or a symlinked
one is a warning of `list_inputs` (the source stage lists them in its result).

An item is `{"id", "url", "caption", "license", "source_url", "meta"}`, plus `"kind":
"image"` when its extension is one of `image_extensions` (decided by the name, for listings
and manifests alike; videos carry no kind), plus `"reject":
[reason, detail]` when listing already refused it (the curate stage records it, stage
`ingest`, without touching the URL). `url` is the resolved location: the real path of a
local file, a full URL otherwise. `id` is a readable stem
plus 12 hex digits of the sha1 of `url`: stable across runs and machines that see the same
URL, and unique among inputs (a URL listed twice is one item, first listing wins). Items come
out in input order, each input's files sorted, so the same inputs give the same list.

Listing never reads video bytes: a bucket of millions of files stays a listing on the driver.
Reading happens per item on the workers (`fetch_item`): the blocklist's rules
(`pipeline.curation.blocklist`; the hash rule needs the bytes), the download
(`pipeline.curation.fetch`: a total deadline per file, `fetch_timeout_s`, retries included; a
read timeout, `fetch_read_timeout_s`; its own byte cap, `fetch_max_bytes`, below the probe's)
and the optional sha256.

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
import tarfile
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urljoin, urlsplit

import fsspec
from fsspec.core import url_to_fs

from data.checks import check_ranges
from data.storage import has_scheme, is_url
from pipeline.curation.blocklist import Blocklist, BlocklistConfig, check_blocklist
from pipeline.curation.fetch import (
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_READ_TIMEOUT_S,
    FetchError,
    fetch,
    file_sha256,
    is_remote,
    with_timeouts,
)

VIDEO_EXTENSIONS = [".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"]
IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".webp"]  # still images (`data.images`)
MANIFEST_SUFFIXES = (".csv", ".csv.gz", ".jsonl", ".jsonl.gz", ".parquet")
REASONS = ("opted_out", "license_not_allowed", "blocked_hash", "fetch_failed", "too_large",
           "fetch_timeout", "not_allowed_scheme", "not_allowed_host", "sidecar_unreadable",
           "not_a_file", "no_caption", "no_image")
IMAGE_SHARD_SUFFIXES = (".tar",)  # image WebDataset shards (LAION-style key.jpg + key.txt/json)
CAPTION_KEYS = ("caption", "text")  # where a sample's .json holds its caption, first found
USED_KEYS = (*CAPTION_KEYS, "url", "license")  # a sample's .json keys that become item fields
TAR_TEXT_MAX = 1 << 20  # a sample's .txt or .json is read at listing up to this many bytes


@dataclass
class RemoteManifestConfig:
    """What the entries of a remote manifest (http(s), s3, gs, ...) may name. By default only
    its own scheme and location (host and port, or bucket): a manifest from elsewhere cannot
    make the workers read their local files or fetch from other servers (SSRF)."""

    allow_schemes: list[str] = field(default_factory=list)  # more schemes; "file": local paths
    allow_hosts: list[str] = field(default_factory=list)  # more hosts, buckets; "*": any
    deny_hosts: list[str] = field(default_factory=list)  # never these, its own included
    # (a domain in either list includes its subdomains)


@dataclass
class IngestConfig:
    inputs: list[str] = field(default_factory=list)  # dirs, globs, files, URLs, manifests
    extensions: list[str] = field(default_factory=lambda: list(VIDEO_EXTENSIONS))
    # Still images, listed beside the videos; an item with one of these carries "kind": "image"
    # ([] lists videos only, as before images were curated).
    image_extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))
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
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S  # a remote file's download, retries included
    fetch_read_timeout_s: float = DEFAULT_READ_TIMEOUT_S  # connect, or wait for the next bytes
    fetch_max_bytes: int = 2 * 2**30  # a remote file's cap (local files: probe.max_bytes)
    remote_manifests: RemoteManifestConfig = field(default_factory=RemoteManifestConfig)
    # Image WebDataset shards (`.tar` inputs): a sample with no caption (.txt, or "caption" /
    # "text" in its .json) is a reject `no_caption`; False keeps it with an empty caption.
    tar_require_caption: bool = True

    def __post_init__(self) -> None:
        check_ranges(self, fetch_retries=">= 0", fetch_backoff_s=">= 0")
        both = set(_exts(self.extensions)) & set(_exts(self.image_extensions))
        if both:
            raise ValueError(f"ingest.image_extensions: {sorted(both)} also in ingest.extensions "
                             f"(a file is a video or an image, not both)")


def _exts(names: list[str]) -> tuple[str, ...]:
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in names)


# Image kinds curation refuses (`data.images`: unsupported_format, or animated), named here so
# that one given explicitly (a manifest row, a single file) is refused by the image probe
# with that reason, not by the video probe; directory listings do not list them.
REFUSED_IMAGE_EXTENSIONS = (".gif", ".bmp", ".tif", ".tiff")


def item_kind(url: str, cfg: IngestConfig) -> str | None:
    """"image" for a URL or path named with one of `cfg.image_extensions` (or, when images are
    on, of REFUSED_IMAGE_EXTENSIONS), else None (a video; the extension decides, the probe then
    checks the content)."""
    if not cfg.image_extensions:
        return None
    path = (urlsplit(url).path if has_scheme(url) else url).lower()
    return "image" if path.endswith(_exts(cfg.image_extensions) + REFUSED_IMAGE_EXTENSIONS) else None


# ----- listing ------------------------------------------------------------------------------
def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def _protocols(fs) -> set[str]:
    return set(fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def _canonical(fs, path: str) -> str:
    """A local file's resolved absolute path (symlinks followed: one file is one item), or a
    remote file's full URL."""
    return os.path.realpath(path) if _is_local(fs) else fs.unstrip_protocol(path)


def _url_to_fs(url: str, storage_options: dict):
    return url_to_fs(url, **storage_options)


def make_id(url: str) -> str:
    """Readable and stable: '<stem>-<12 hex of sha1(url)>'. The stem is the member's for a
    shard sample (`<tar>#<member>`), and has no '.' (a WebDataset key cannot hold one: a file
    named `a.b.mp4` would have broken the shard stage)."""
    named = url.rsplit("#", 1)[1] if "#" in url else (
        urlsplit(url).path if has_scheme(url) else url)
    stem = os.path.splitext(posixpath.basename(named))[0]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:40].strip("_") or "video"
    return f"{slug}-{hashlib.sha1(url.encode()).hexdigest()[:12]}"


def is_image_shard(url: str) -> bool:
    """An input that is a WebDataset tar of images (or a glob of them)."""
    path = urlsplit(url).path if has_scheme(url) else url
    return path.lower().endswith(IMAGE_SHARD_SUFFIXES)


def _tar_samples(fs, path: str) -> dict[str, dict[str, tuple]]:
    """The samples of one tar, WebDataset's way (the key is the member's name up to the first
    dot of its basename) -> {key: {ext: (member name, data offset, size, text or None)}}; the
    .txt and .json members are read (up to TAR_TEXT_MAX), the others only located."""
    samples: dict[str, dict[str, tuple]] = {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for m in tf:
            if not m.isfile():
                continue
            folder, base = posixpath.split(m.name)
            stem, _, ext = base.partition(".")
            ext = ext.lower()
            text = None
            if ext in ("txt", "json") and m.size <= TAR_TEXT_MAX:
                text = tf.extractfile(m).read().decode("utf-8", errors="replace")
            samples.setdefault(posixpath.join(folder, stem), {})[ext] = (
                m.name, m.offset_data, m.size, text)
    return samples


def _tar_items(spec: str, cfg: IngestConfig) -> list[dict]:
    """Items of image WebDataset shards (a tar, or a glob of tars): one per sample, kind
    "image", located by its member's byte range (`tar` in the item: the worker reads only
    those bytes, `fetch_item`). Caption: the sample's .txt, else its .json's "caption" or
    "text"; the .json's other fields ride along as metadata (its "url" as source_url). A
    sample without an image member is a reject `no_image`; one without a caption `no_caption`
    (unless ingest.tar_require_caption=false)."""
    fs, path = _url_to_fs(spec, _listing_options(spec, cfg))
    paths = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
    if not paths or not all(fs.exists(p) for p in paths):
        raise FileNotFoundError(f"ingest input not found: {spec}")
    exts = [e.lstrip(".") for e in _exts(cfg.image_extensions) + REFUSED_IMAGE_EXTENSIONS]
    items = []
    for p in paths:
        tar_url = _canonical(fs, p)
        for key, members in sorted(_tar_samples(fs, p).items()):
            meta: dict = {}
            if "json" in members and members["json"][3] is not None:
                try:
                    got = json.loads(members["json"][3])
                    meta = got if isinstance(got, dict) else {"json": got}
                except json.JSONDecodeError:
                    meta = {}
            txt = members.get("txt", (None, 0, 0, None))[3]
            caption = (txt or "").strip() or next(
                (str(meta[k]).strip() for k in CAPTION_KEYS if meta.get(k)), "")
            image = next((e for e in exts if e in members), None)
            name = members[image][0] if image else next(iter(members.values()))[0]
            item = {"url": f"{tar_url}#{name}", "caption": caption,
                    "license": (str(meta["license"]) if meta.get("license")
                                else cfg.default_license),
                    "source_url": str(meta["url"]) if meta.get("url") else None,
                    "meta": {"shard": {"key": key, **{k: _jsonable(v) for k, v in meta.items()
                                                      if k not in USED_KEYS}}}}
            if image is None:
                item["reject"] = ["no_image", f"sample {key} has {sorted(members)}, no image"]
            else:
                _, offset, size, _ = members[image]
                item["kind"] = "image"
                item["tar"] = {"url": tar_url, "member": name, "offset": offset, "size": size}
                if not caption and cfg.tar_require_caption:
                    item["reject"] = ["no_caption", f"sample {key}: no .txt and no "
                                                    f"{list(CAPTION_KEYS)} in its .json "
                                                    f"(ingest.tar_require_caption)"]
            items.append(item)
    return items


def fetch_tar_member(tar: dict, cache_dir: str | os.PathLike, storage_options: dict,
                     max_bytes: int | None) -> str:
    """A local file holding one tar member's bytes (its byte range, read once into the cache
    under a name with the member's extension). Raises FetchError."""
    if max_bytes is not None and tar["size"] > max_bytes:
        raise FetchError("too_large", f"{tar['size']} bytes > {max_bytes}")
    ext = posixpath.splitext(tar["member"])[1][:8]
    dest = os.path.join(os.fspath(cache_dir), hashlib.sha1(
        f"{tar['url']}#{tar['member']}".encode()).hexdigest() + ext)
    if os.path.exists(dest):
        return dest
    os.makedirs(cache_dir, exist_ok=True)
    try:
        fs, path = _url_to_fs(tar["url"], storage_options)
        data = fs.cat_file(path, start=tar["offset"], end=tar["offset"] + tar["size"])
    except Exception as e:  # noqa: BLE001 - any transport error is this sample's problem
        raise FetchError("fetch_failed", f"{tar['member']}: {type(e).__name__}: {e}"[:300]) from e
    if len(data) != tar["size"]:
        raise FetchError("fetch_failed", f"{tar['member']}: read {len(data)} of {tar['size']} "
                                         f"bytes (the tar changed since it was listed)")
    tmp = f"{dest}.{os.getpid()}.part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)
    return dest


def is_manifest(url: str) -> bool:
    path = urlsplit(url).path if has_scheme(url) else url
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
    low = (urlsplit(url).path if has_scheme(url) else url).lower()
    if low.endswith(".parquet"):
        import pyarrow.parquet as pq  # lazy: pyarrow.parquet ~0.6 s to import, needed only here

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


def _host_listed(host: str, hosts: list[str]) -> bool:
    """`host` is one of `hosts` or a subdomain of one."""
    labels = host.split(".")
    listed = {h.strip().lower().lstrip(".") for h in hosts} - {""}
    return any(".".join(labels[i:]) in listed for i in range(len(labels)))


def _location(parts) -> str:
    """'host[:port]' of a split URL (no credentials; '?' for a port that is not a number)."""
    try:
        port = parts.port
    except ValueError:
        return f"{(parts.hostname or '').lower()}:?"
    return (parts.hostname or "").lower() + (f":{port}" if port is not None else "")


def _remote_entry(manifest: str, schemes: set[str], p: str, policy: RemoteManifestConfig
                  ) -> tuple[str, tuple[str, str] | None]:
    """An entry `p` of the remote manifest at `manifest` (whose filesystem speaks `schemes`)
    -> (its URL, None) or, refused, (its URL or the entry as written, (reason, detail)).
    Relative entries resolve against the manifest's URL, and what they resolve to is checked
    like any other entry (`//host/x` names another host). Details name the entry and the
    setting that would allow it, never the manifest's URL (it may be a signed one)."""
    allowed = schemes | {s.lower() for s in policy.allow_schemes}
    web = urlsplit(manifest).scheme in ("http", "https")
    local = (os.path.isabs(p) and not (web and p.startswith("//"))  # //host/x: a URL on the web
             or p.lower().startswith("file:"))
    if "::" in p:  # fsspec URL chaining (zip://x::file:///...) could reach anything
        return p, ("not_allowed_scheme", f"{p!r}: a chained URL, from a remote manifest")
    if local:
        if "file" not in allowed:
            return p, ("not_allowed_scheme", f"{p!r}: a local path, from a remote manifest "
                                             f"(ingest.remote_manifests.allow_schemes)")
        return os.path.realpath(urlsplit(p).path if p.lower().startswith("file:") else p), None
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", p):  # a URL
        url = p
    elif web:
        url = urljoin(manifest, p)
    else:  # bucket keys are opaque: no '..' collapsing, the bucket stays the manifest's
        url = f"{manifest.rsplit('/', 1)[0]}/{p}"
    parts, own = urlsplit(url), urlsplit(manifest)
    if parts.scheme not in allowed:
        return p, ("not_allowed_scheme", f"{p!r}: scheme {parts.scheme!r}, from a remote "
                                         f"manifest on {own.scheme!r} "
                                         f"(ingest.remote_manifests.allow_schemes)")
    host, where = (parts.hostname or "").lower(), _location(parts)
    if _host_listed(host, policy.deny_hosts):
        return url, ("not_allowed_host", f"{where!r} is in ingest.remote_manifests.deny_hosts")
    if not (where == _location(own) or "*" in policy.allow_hosts
            or _host_listed(host, policy.allow_hosts)):
        return url, ("not_allowed_host", f"{where!r} is not the remote manifest's own "
                                         f"{_location(own)!r} "
                                         f"(ingest.remote_manifests.allow_hosts)")
    return url, None


def _listing_options(spec: str, cfg: IngestConfig) -> dict:
    """Storage options for listing `spec`: a dead server fails after the read timeout."""
    return with_timeouts(spec, cfg.storage_options, cfg.fetch_read_timeout_s, None)


def _manifest_items(url: str, cfg: IngestConfig) -> list[dict]:
    rows = _read_manifest(url, _listing_options(url, cfg))
    fs, mpath = _url_to_fs(url, cfg.storage_options)
    local = _is_local(fs)
    base = os.path.dirname(os.path.abspath(mpath)) if local else ""
    known = {cfg.path_column, cfg.caption_column, cfg.license_column, cfg.source_url_column}
    items = []
    for n, row in enumerate(rows, 1):
        p = row.get(cfg.path_column)
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"manifest {url} row {n}: no '{cfg.path_column}' "
                             f"(columns: {sorted(row)})")
        p = p.strip()
        refused = None
        if not local:  # not trusted: see RemoteManifestConfig
            resolved, refused = _remote_entry(url, _protocols(fs), p, cfg.remote_manifests)
        elif has_scheme(p):
            rfs, rpath = _url_to_fs(p, cfg.storage_options)
            resolved = _canonical(rfs, rpath)
        else:
            resolved = os.path.realpath(os.path.join(base, p))

        def cell(col: str) -> str | None:
            v = _jsonable(row.get(col))
            return None if v is None or v == "" else str(v)

        items.append({
            "url": resolved,
            "caption": cell(cfg.caption_column) or "",
            "license": cell(cfg.license_column) or cfg.default_license,
            "source_url": cell(cfg.source_url_column),
            "meta": {k: _jsonable(v) for k, v in row.items() if k not in known},
            **({"reject": list(refused)} if refused else {}),
        })
    return items


def _local_tree(root: str, recursive: bool, warnings: list[str]) -> dict[str, str]:
    """Everything under a local directory -> {path: "file" | "directory" | "dirlink"}.
    Symlinked directories are not followed (no loops, no file twice); they and unreadable
    subdirectories become warnings instead of silent gaps."""
    out: dict[str, str] = {}

    def unreadable(e: OSError) -> None:
        if e.filename == root:
            raise PermissionError(f"ingest input {root} cannot be read: {e.strerror}")
        warnings.append(f"{e.filename}: unreadable directory, not listed ({e.strerror})")

    def entries(d: str) -> list[tuple[str, str]]:
        try:
            with os.scandir(d) as it:
                found = [(e.path, "dirlink" if e.is_symlink() and e.is_dir() else
                          "directory" if e.is_dir(follow_symlinks=False) else "file")
                         for e in it]
        except OSError as e:
            unreadable(e)
            return []
        return found

    todo = [root]
    while todo:
        for path, kind in entries(todo.pop()):
            out[path] = kind
            if kind == "directory" and recursive:
                todo.append(path)
            elif kind == "dirlink":
                warnings.append(f"{path}: a symlink to a directory, not followed")
    return out


def _listing_items(spec: str, cfg: IngestConfig, warnings: list[str]) -> list[dict]:
    fs, path = _url_to_fs(spec, _listing_options(spec, cfg))
    exts = _exts(cfg.extensions) + _exts(cfg.image_extensions)
    is_http = spec.startswith(("http://", "https://"))
    if not is_http and any(c in path for c in "*?["):
        found = {n: i.get("type", "file") for n, i in fs.glob(path, detail=True).items()}
    elif not path.lower().endswith(exts) and fs.isdir(path):
        if _is_local(fs):
            found = _local_tree(path, cfg.recursive, warnings)
        else:
            found = {n: i.get("type", "file") for n, i in (
                fs.find(path, detail=True) if cfg.recursive
                else {e["name"]: e for e in fs.ls(path, detail=True)}).items()}
    elif fs.exists(path):  # one file (named with a video extension: no directory probe)
        found = {path: "directory" if _is_local(fs) and os.path.isdir(path) else "file"}
    else:
        raise FileNotFoundError(f"ingest input not found: {spec}")
    # A listing says which sidecars exist; for one file, reading its sidecar tells.
    present = None if len(found) == 1 else {n for n, kind in found.items()
                                           if kind not in ("directory", "dirlink")}
    items = []
    for name in sorted(found):
        if not name.lower().endswith(exts):
            continue
        item = {"url": _canonical(fs, name), "caption": "", "license": cfg.default_license,
                "source_url": None, "meta": {}}
        if found[name] in ("directory", "dirlink"):
            item["reject"] = ["not_a_file", f"{name} is a directory"]
        else:
            item["caption"], why = _sidecar(fs, name, present, cfg)
            if why:
                item["reject"] = ["sidecar_unreadable", why]
        items.append(item)
    return items


def _sidecar(fs, path: str, present: set[str] | None, cfg: IngestConfig
             ) -> tuple[str, str | None]:
    """-> (the caption in `<name>.txt` beside `path`, or ""; why it could not be read)."""
    if not cfg.sidecar_captions:
        return "", None
    txt = posixpath.splitext(path)[0] + ".txt"
    if present is not None and txt not in present:
        return "", None
    try:
        return fs.cat_file(txt).decode("utf-8", errors="replace").strip(), None
    except (FileNotFoundError, IsADirectoryError):
        return "", None
    except OSError as e:  # unreadable: the video is a reject, not one without its caption
        return "", f"caption {txt}: {type(e).__name__}: {e.strerror or e}"


def check_inputs(cfg: IngestConfig) -> None:
    """Before any stage: the configuration names inputs, and each local one (a path, a
    `file://` URL, or a glob's fixed leading directories) exists. Remote ones are listed by
    the source stage. Raises ValueError naming the key."""
    if not cfg.inputs:
        raise ValueError("ingest.inputs is empty: list directories, globs, files, URLs or "
                         "manifests")
    for i, spec in enumerate(cfg.inputs):
        if is_url(spec):
            continue
        path = spec.removeprefix("file://")
        magic = re.search(r"[*?\[]", path)
        if magic:
            path = os.path.dirname(path[: magic.start()]) or "."
        if not os.path.exists(path):
            what = "directory of the glob" if magic else "input"
            raise ValueError(f"ingest.inputs[{i}]: the {what} {path} does not exist")


def list_inputs(cfg: IngestConfig, warnings: list[str] | None = None) -> list[dict]:
    """All items of all inputs, deduplicated by URL, in a deterministic order. What a listing
    could not look into (unreadable or symlinked subdirectories) is appended to `warnings`.

    Raises (a configuration error, before any work) for a missing input, an input that
    yields no files, or a manifest row without a path."""
    items: list[dict] = []
    seen: set[str] = set()
    warnings = [] if warnings is None else warnings
    if not cfg.inputs:
        raise ValueError("ingest.inputs is empty")
    for spec in cfg.inputs:
        found = (_manifest_items(spec, cfg) if is_manifest(spec)
                 else _tar_items(spec, cfg) if is_image_shard(spec)
                 else _listing_items(spec, cfg, warnings))
        if not found:
            raise ValueError(f"ingest input {spec} holds no files with extensions "
                             f"{list(cfg.extensions) + list(cfg.image_extensions)}")
        for it in found:
            if it["url"] not in seen:
                seen.add(it["url"])
                kind = it.pop("kind", None) or item_kind(it["url"], cfg)
                items.append({"id": make_id(it["url"]), **it, **({"kind": kind} if kind else {})})
    return items


# ----- on the worker ------------------------------------------------------------------------
def fetch_item(item: dict, cfg: IngestConfig, blocklist: Blocklist, cache_dir: str | os.PathLike,
               *, max_bytes: int | None = None) -> tuple[dict | None, tuple[str, str] | None]:
    """Everything ingest does for one item on a worker; never raises for a bad input.

    A reject listing already decided (`item["reject"]`) is returned untouched. Checks the
    source and licence rules (free), fetches the bytes (remote only, at most
    `cfg.fetch_max_bytes` and `max_bytes`), hashes them when asked to or when the blocklist
    lists hashes, and checks the hash rule.
    -> (item + {"local_path", "sha256"?}, None) or (None, (reason, detail))."""
    if item.get("reject"):
        return None, tuple(item["reject"])
    hit = check_blocklist(item, blocklist)
    if hit:
        return None, hit
    tar = item.get("tar")
    remote = is_remote(tar["url"] if tar else item["url"])
    cap = max_bytes
    if remote and cfg.fetch_max_bytes and (cap is None or cfg.fetch_max_bytes < cap):
        cap = cfg.fetch_max_bytes
    try:
        if tar:  # a sample of an image shard: its member's bytes only
            local = fetch_tar_member(tar, cache_dir, cfg.storage_options, cap)
        else:
            local = fetch(item["url"], cache_dir, max_bytes=cap,
                          storage_options=cfg.storage_options, retries=cfg.fetch_retries,
                          backoff_s=cfg.fetch_backoff_s, timeout_s=cfg.fetch_timeout_s,
                          read_timeout_s=cfg.fetch_read_timeout_s)
    except FetchError as e:
        if e.reason == "too_large" and cap != max_bytes:
            return None, (e.reason, f"{e.detail} (ingest.fetch_max_bytes)")
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
