"""Leases: who is computing what in a shared store, so that two people never compute the same thing at once.

A lease is a small JSON file in the store, ``_leases/<scope>/<generation>.json``, written through the
zarr store's own ``set_if_not_exists``: an exclusive create on a local or shared filesystem (a hard
link) and a conditional put on object storage. The holder of a scope is the newest generation's file.
To take a scope, a process creates the next generation after the newest one; only one process can
create a given generation, so only one wins even when several see the same lease expire at once.

The holder renews its expiry every ``ttl / 3`` seconds from a background thread and deletes the file
when done. A holder that dies (SIGKILL, a lost machine) stops renewing; after ``ttl`` its
lease has expired and the next process takes the scope over and resumes from the completion marks,
recomputing only unfinished chunks; a holder on the same machine whose process is gone is taken over
at once. Work under a lease is idempotent (a task owns its region and
writes the same bytes whoever runs it), so a holder that was only slow, not dead, does no harm.

A lease file that is not a lease record (empty, not JSON, a field missing: a full disk, an edit) is
an expired holder: the next process takes the next generation over it and deletes it, and
``verify`` names it (``--repair`` deletes it). Treating it as "nobody" would retry the same
generation forever.

docs/sharing.md explains the choice against the alternatives (lock files, Icechunk transactions).
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from . import provenance, store

ROOT = store.LEASES
DEFAULT_TTL = 60.0  # seconds without renewal after which a lease is free to take


@dataclass(frozen=True)
class Holder:
    """The newest lease of a scope, as read from the store."""

    scope: str
    generation: int
    by: str  # user@host
    pid: int
    token: str
    since: float  # unix time it was taken
    expires: float

    host: str = ""
    damaged: bool = False  # the file is not a lease record (empty, not JSON, fields missing): never active

    def active(self, now: float | None = None) -> bool:
        """Renewed in time, and not held by a process of this machine that has died (no need to wait out its ttl)."""
        if self.damaged:
            return False
        if (now if now is not None else time.time()) >= self.expires:
            return False
        return not (self.host == socket.gethostname() and not _alive(self.pid))

    def describe(self) -> str:
        if self.damaged:
            return "held by nobody (its lease file is damaged and is taken over)"
        since = provenance.utc_stamp(self.since)
        return f"being computed by {self.by} (pid {self.pid}) since {since}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _key(scope: str, generation: int) -> str:
    return f"{ROOT}/{scope}/{generation:08d}.json"


def _list(zstore, prefix: str) -> list[str]:
    async def collect():
        return [key async for key in zstore.list_prefix(prefix)]

    return sync(collect())


def _read(zstore, key: str) -> dict | None:
    buffer = sync(zstore.get(key, prototype=default_buffer_prototype()))
    if buffer is None:
        return None
    try:
        return json.loads(buffer.to_bytes())
    except ValueError:
        return None


# A lease record's fields and their types; "host" was added later and may be absent.
_MAX_AHEAD = 24 * 3600.0  # seconds: see parse
_FIELDS = {"by": str, "pid": int, "token": str, "since": (int, float), "expires": (int, float)}


def parse(record) -> dict | None:
    """The record if it is a well-formed lease, else None (a damaged file: empty, truncated, edited)."""
    if not isinstance(record, dict):
        return None
    for name, kind in _FIELDS.items():
        if isinstance(record.get(name), bool) or not isinstance(record.get(name), kind):
            return None
    # NaN (JSON allows it through Python) would never expire, nor would a time far ahead: a holder renews
    # to now + ttl, so anything more than a day ahead is an edited file, not a lease (clocks differ by less).
    if not all(math.isfinite(record[name]) for name in ("since", "expires")) or record["expires"] > time.time() + _MAX_AHEAD:
        return None
    return record


def damaged_files(zstore: Store) -> list[str]:
    """Keys of the lease files that are not lease records; commands treat them as expired (verify reports them)."""
    keys = [key for key in _list(zstore, f"{ROOT}/") if key.endswith(".json")]
    return [key for key in sorted(keys) if parse(_read(zstore, key)) is None]


def _write(zstore, key: str, record: dict, exclusive: bool) -> bool:
    """Write a lease file; with ``exclusive``, only if it does not exist, and say whether we created it."""
    data = json.dumps(record, sort_keys=True).encode()
    buffer = default_buffer_prototype().buffer.from_bytes(data)
    if not exclusive:
        sync(zstore.set(key, buffer))
        return True
    if isinstance(zstore, FsspecStore):
        try:  # S3 (and compatible servers): a conditional put, If-None-Match: *
            sync(zstore.fs._pipe_file(f"{zstore.path.rstrip('/')}/{key}", data, mode="create"))
            return True
        except FileExistsError:
            return False
        except TypeError:  # this filesystem has no exclusive create: fall back to zarr's check-then-set
            pass
    if sync(zstore.exists(key)):
        return False
    try:
        sync(zstore.set_if_not_exists(key, buffer))  # a hard link on a filesystem: exclusive
    except (FileExistsError, OSError):
        return False
    return _read(zstore, key) == record  # set_if_not_exists is silent when it loses: check who won


def _delete(zstore: Store, key: str) -> None:
    """Delete a lease file and, on a filesystem, the folders it leaves empty: a finished run leaves no trace."""
    sync(zstore.delete(key))
    if isinstance(zstore, LocalStore):
        root = Path(zstore.root)
        folder = (root / key).parent
        while folder != root:
            try:
                folder.rmdir()
            except OSError:  # not empty (someone else's lease) or already gone
                break
            folder = folder.parent


def discard(zstore: Store, key: str) -> None:
    """Delete a damaged lease file (``verify --repair``), and the folders it leaves empty."""
    _delete(zstore, key)


def _generations(zstore, scope: str) -> list[int]:
    out = []
    prefix = f"{ROOT}/{scope}/"
    for key in _list(zstore, prefix):
        name = key[len(prefix):]  # a file of this scope, not of a scope nested below it
        if name.endswith(".json") and name[:-5].isdigit():
            out.append(int(name[:-5]))
    return sorted(out)


def holder(zstore: Store, scope: str) -> Holder | None:
    """The newest lease of ``scope`` (active or expired), or None when nobody holds it."""
    while True:
        generations = _generations(zstore, scope)
        if not generations:
            return None
        raw = _read(zstore, _key(scope, generations[-1]))
        if raw is not None or sync(zstore.exists(_key(scope, generations[-1]))):
            break
        # Deleted between the listing and the read: released, or an older generation deleted by whoever just
        # took the next one. List again: answering "nobody" in the second case would let acquire take
        # generation 0 again beside the new holder (two winners; seen under load in tests/test_leases.py).
    record = parse(raw)
    if record is None:
        # Damaged: not a holder anyone can be waiting on. Returned as an expired holder so that the next
        # acquire takes the next generation over it (and deletes it); treating it as "nobody" would make
        # acquire retry the same generation forever.
        return Holder(scope, generations[-1], "?", 0, "", 0.0, 0.0, damaged=True)
    return Holder(scope, generations[-1], record["by"], record["pid"], record["token"], record["since"],
                  record["expires"], record.get("host", ""))


def active_holders(zstore: Store) -> dict[str, Holder]:
    """Every scope someone is computing right now."""
    scopes = {key[len(ROOT) + 1:].rsplit("/", 1)[0] for key in _list(zstore, f"{ROOT}/")}
    out = {}
    for scope in sorted(scopes):
        h = holder(zstore, scope)
        if h is not None and h.active():
            out[scope] = h
    return out


class Lease:
    """The right to compute ``scope`` in this store, held while renewed.

    ``acquire()`` returns True when taken and False when someone else holds it; ``holder`` then says who.
    Use as ``with lease:`` after a successful acquire, or call ``release()``. ``zstore`` is the zarr
    store (``group.store``) of the pipeline store, which need not hold a zarr hierarchy yet.
    """

    def __init__(self, zstore: Store, scope: str, ttl: float = DEFAULT_TTL):
        if not scope or any(part in ("", ".", "..") for part in scope.split("/")):
            raise ValueError(f"bad lease scope {scope!r}")
        self.zstore, self.scope, self.ttl = zstore, scope, ttl
        self.token = uuid.uuid4().hex
        self.generation: int | None = None
        self.holder: Holder | None = None
        self.lost = False
        self._since = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        stamp = provenance.stamp()
        return {"by": stamp["by"], "host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "since": self._since,
                "expires": time.time() + self.ttl}

    def acquire(self) -> bool:
        zstore = self.zstore
        current = holder(self.zstore, self.scope)
        if current is not None and current.active():
            self.holder = current
            return False
        generation = 0 if current is None else current.generation + 1
        self._since = time.time()
        if not _write(zstore, _key(self.scope, generation), self._record(), exclusive=True):
            self.holder = holder(self.zstore, self.scope)
            return False
        self.generation, self.holder = generation, None
        for old in _generations(zstore, self.scope):  # keep only the newest generation
            if old < generation:
                _delete(zstore, _key(self.scope, old))
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease {self.scope}", daemon=True)
        self._thread.start()
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self.renew()

    def renew(self) -> None:
        newest = _generations(self.zstore, self.scope)
        if newest and newest[-1] != self.generation:  # taken over after we stopped renewing in time
            self.lost = True
            return
        _write(self.zstore, _key(self.scope, self.generation), self._record(), exclusive=False)

    def release(self) -> None:
        """Stop renewing and delete the lease file: the next process takes generation 0 again, which is
        safe because creating a generation is exclusive whatever happened before."""
        if self.generation is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost:
            _delete(self.zstore, _key(self.scope, self.generation))
        self.generation = None

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def wait_for(zstore: Store, scope: str, poll: float = 2.0, on_wait=None) -> None:
    """Block while someone else holds ``scope`` (their lease active); ``on_wait(holder)`` once, when we start waiting."""
    told = False
    while True:
        current = holder(zstore, scope)
        if current is None or not current.active():
            return
        if on_wait and not told:
            on_wait(current)
            told = True
        time.sleep(poll)


def take(zstore: Store, scope: str, ttl: float = DEFAULT_TTL, on_wait=None, poll: float = 2.0) -> Lease:
    """Acquire ``scope``, waiting as long as someone else holds it; the caller releases the returned lease."""
    lease = Lease(zstore, scope, ttl)
    while not lease.acquire():
        wait_for(zstore, scope, poll, on_wait)
    return lease
