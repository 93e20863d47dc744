"""The blocklist: opt-outs and exclusions, checked on every ingested item.

A `BlocklistConfig` (inline lists and/or a JSON/YAML file at a path or URL) builds a
`Blocklist`, which excludes an item with a reason:
- `opted_out`: its `source_url` or `url` is under an opted-out source: a domain (also
  matching its subdomains), a `domain/path` or `scheme://` URL prefix, or a local path prefix;
- `license_not_allowed`: its licence is listed in `licenses`, or `allowed_licenses` is set
  and its licence (possibly missing) is not in it. Licences compare case- and
  separator-insensitively ("CC BY-NC 4.0" == "cc-by-nc-4.0");
- `blocked_hash`: the sha256 of its bytes is listed in `sha256` (known only once a worker has
  read the bytes: `pipeline.curation.ingest.fetch_item`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

import fsspec
import yaml

from data.storage import has_scheme


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
            if has_scheme(e) or e.startswith("/"):
                self.prefixes.setdefault(_host(e), []).append(e)
                if e.startswith("/"):  # local items are listed by resolved path
                    raw = str(entry).strip()
                    real = (os.path.realpath(raw) + ("/" if raw.endswith("/") else "")).lower()
                    if real != e:
                        self.prefixes[""].append(real)
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
        hostpath = host + urlsplit(low).path if has_scheme(low) else low
        for p in self.prefixes.get(host, ()):
            if low.startswith(p) or (not has_scheme(p) and hostpath.startswith(p)):
                return p
        return None


def _host(url: str) -> str:
    return (urlsplit(url).hostname or "") if has_scheme(url) else ""


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
