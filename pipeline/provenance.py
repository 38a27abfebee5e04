"""Where a stored thing came from: the content hash that names it, the time and author of a mark, and the stamp
and state of a representation's array.

Plain functions of their arguments, with no zarr or torch: ``info`` and ``verify`` read stamps without loading the
stages. The hashes are on disk (a configuration's names ``runs/<digest>``, a source's fingerprint and a
representation's spec hash are in the attrs), so each caller's length and JSON ``default`` are part of the store
format: they are arguments here, never defaults that could drift.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import socket
import time

from ._version import __version__


def digest(data: bytes, *, length: int) -> str:
    """The first ``length`` hex digits of sha256(``data``) (64: all of them)."""
    return hashlib.sha256(data).hexdigest()[:length]


def content_hash(obj, *, length: int, default=None) -> str:
    """sha256 of ``obj`` as sorted-key JSON, first ``length`` hex digits: what fingerprints a config or a spec.

    ``default`` is ``json.dumps``'s: what turns a value JSON cannot hold into one it can (``str`` for paths).
    """
    return digest(json.dumps(obj, sort_keys=True, default=default).encode(), length=length)


def utc_stamp(seconds: float | None = None) -> str:
    """``seconds`` since the epoch (now when None) in ISO 8601 UTC to the second: ``2026-11-28T19:26:03Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def stamp() -> dict:
    """Who wrote something, and when: the stamp every mark carries."""
    return {"by": f"{getpass.getuser()}@{socket.gethostname()}", "at": utc_stamp()}


def rep_stamp(rep, fingerprint: str) -> dict:
    """What a representation's array records of its making: the spec and its hash, the source, the code version."""
    return {"spec": rep.spec(), "spec_hash": rep.spec_hash(), "source_fingerprint": fingerprint,
            "code_version": __version__, "kind": rep.kind}


def rep_state(array, rep, fingerprint: str) -> str:
    """'fresh' (complete and up to date), 'partial' (same spec, unfinished) or 'stale' (absent or different).

    ``array``: the representation's stored array (``features/<split>/<name>``), None when there is none;
    ``rep``: the representation as this code computes it (``representations.get(name)``).
    """
    if array is None:
        return "stale"
    attrs = array.attrs.asdict()
    if attrs.get("spec_hash") != rep.spec_hash() or attrs.get("source_fingerprint") != fingerprint:
        return "stale"
    return "fresh" if attrs.get("complete") else "partial"
