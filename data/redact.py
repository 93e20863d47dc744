"""Credentials in the config and on the command line, kept out of everything a run writes.

Secrets belong in the environment (``WANDB_API_KEY``, ``AWS_SECRET_ACCESS_KEY``, ...). One that
reaches the config anyway, such as ``ingest.storage_options.secret=...`` or an HTTP header in
``storage_options``, is used as given: the config the stages receive is never changed. What is
written passes through :func:`redact` first, which replaces the value with ``REDACTED``:
``lineage.json`` (config, argv, the submitter's argv), every ``info.json``, the W&B run config
and the process's ``sys.argv`` that W&B records, and the report (which also redacts files
written before this existed). An error message that quotes a credential's value is scrubbed of
it (:func:`scrub`) in ``_FAILED.json``, ``lineage.json`` and the log. ``spacetime submit``
refuses a credential in its overrides, as Ray keeps a job's command line in plain text.

Which keys hold credentials:

- inside a mapping named in ``CONTAINERS`` (free-form options handed to fsspec), at any depth,
  a key with a word from ``CONTAINER_WORDS`` (``key``, ``secret``, ``token``, ``Authorization``
  in ``headers``, ``aws_secret_access_key`` in ``client_kwargs``, ...);
- anywhere, a key with a word from ``WORDS`` (``password``, ``api_token``, ...; not bare
  ``key``, which is common in the config's own fields, e.g. ``embed.frames_key``).

A word is a part of the key split at ``_``, ``-`` and case changes. Command-line overrides
(``a.b.c=value`` strings, anywhere in the record) are judged by their dotted key; a dict value
(``ingest.storage_options={key:...,secret:...}``) is redacted entry by entry and written back as
a valid override. A value that is an interpolation (``'${oc.env:MY_SECRET}'``) is kept: it names
where the secret comes from, not the secret, and is how to pass one without writing it down.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
CONTAINERS = frozenset({"storage_options"})
WORDS = frozenset({"secret", "token", "password", "passwd", "credential",
                   "credentials", "authorization", "cookie", "apikey"})
CONTAINER_WORDS = WORDS | {"key", "auth", "signature", "sas", "private", "connection"}
_OVERRIDE = re.compile(r"^(~|\+\+|\+)?([A-Za-z_][\w.\-\[\]/@]*)=(.*)$", re.S)


def words(key: str) -> set[str]:
    """'aws_secret_access_key' -> {aws, secret, access, key}; 'apiKey' -> {api, key, apikey}."""
    parts = [p.lower() for p in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", str(key))]
    return {*parts, "".join(parts)}


def is_secret(path: tuple[str, ...]) -> bool:
    """Whether the value at a key path (('ingest', 'storage_options', 'secret')) is a credential."""
    if not path:
        return False
    inside = any(p in CONTAINERS for p in path[:-1])
    return bool(words(path[-1]) & (CONTAINER_WORDS if inside else WORDS))


def _is_reference(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def redact(obj: Any, path: tuple[str, ...] = ()) -> Any:
    """A copy of `obj` (a JSON-like record: dicts, lists, strings, numbers) with every credential
    replaced by REDACTED; `path` is where `obj` sits in the config."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            p = (*path, str(k))
            if is_secret(p) and v not in (None, "", {}, []) and not _is_reference(v):
                out[k] = REDACTED
            else:
                out[k] = redact(v, p)
        return out
    if isinstance(obj, (list, tuple)):
        return [redact(v, path) for v in obj]
    if isinstance(obj, str):
        return redact_override(obj)
    return obj


def secret_values(obj: Any, path: tuple[str, ...] = ()) -> set[str]:
    """The credentials in a config (the strings :func:`redact` replaces), to scrub from free
    text such as an error message that quotes one."""
    if isinstance(obj, dict):
        out: set[str] = set()
        for k, v in obj.items():
            p = (*path, str(k))
            if is_secret(p) and not _is_reference(v):
                out |= {s for s in _strings(v) if len(s) >= 4}
            else:
                out |= secret_values(v, p)
        return out
    if isinstance(obj, (list, tuple)):
        return set().union(*(secret_values(v, path) for v in obj))
    return set()


def _strings(v: Any) -> list[str]:
    if isinstance(v, dict):
        return [s for x in v.values() for s in _strings(x)]
    if isinstance(v, (list, tuple)):
        return [s for x in v for s in _strings(x)]
    return [str(v)] if v is not None else []


def scrub(text: str, values: set[str]) -> str:
    """`text` with each of `values` replaced by REDACTED (longest first)."""
    for v in sorted(values, key=len, reverse=True):
        text = text.replace(v, REDACTED)
    return text


def redact_override(arg: str) -> str:
    """A command-line argument with the credential it sets replaced (other strings unchanged)."""
    m = _OVERRIDE.match(arg)
    if not m:
        return arg
    prefix, key, value = m.group(1) or "", m.group(2), m.group(3)
    path = tuple(key.split("."))
    if _is_reference(value) and not value.lstrip().startswith("{"):
        return arg
    if is_secret(path):
        return f"{prefix}{key}={render(REDACTED)}"
    if value.lstrip().startswith("{"):  # a mapping: redact inside it, keep the rest usable
        from hydra.core.override_parser.overrides_parser import (
            OverridesParser,  # lazy: hydra ~0.4 s; CLI start-up 0.1 s, 9 s with eager imports
        )

        try:
            parsed = OverridesParser.create().parse_override(arg).value()
        except Exception:  # noqa: BLE001 - unparseable: keep nothing of it that may be secret
            return arg if not _may_hold_secret(path, value) else f"{prefix}{key}={render(REDACTED)}"
        if isinstance(parsed, dict):
            clean = redact(parsed, path)
            if clean != parsed:
                return f"{prefix}{key}={render(clean)}"
    return arg


def _may_hold_secret(path: tuple[str, ...], value: str) -> bool:
    keys = re.findall(r"([A-Za-z_][\w\-]*)\s*:", value)
    inside = any(p in CONTAINERS for p in path) or any(k in CONTAINERS for k in keys)
    return any(words(k) & (CONTAINER_WORDS if inside else WORDS) for k in keys)


def render(value: Any) -> str:
    """A value in Hydra's override syntax (the inverse of its parser, for plain values)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(render(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def credential_overrides(args: list[str]) -> list[str]:
    """The dotted keys of the arguments that set a credential literally (not by reference)."""
    return [_OVERRIDE.match(a).group(2) for a in args
            if _OVERRIDE.match(a) and redact_override(a) != a]
