"""Leases: one holder per scope, even under a race; expiry and take-over; nothing left behind; who holds what."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

from conftest import race_for_lease
from pipeline import leases
from pipeline.store import zarr_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def zs(tmp_path):
    return zarr_store(tmp_path / "store.zarr")


def test_one_holder_and_release_leaves_nothing(zs, tmp_path):
    first, second = leases.Lease(zs, "features/train/stats"), leases.Lease(zs, "features/train/stats")
    assert first.acquire()
    assert not second.acquire()
    assert second.holder.token == first.token and second.holder.pid == first._record()["pid"]
    assert "being computed by" in second.holder.describe()
    assert set(leases.active_holders(zs)) == {"features/train/stats"}
    first.release()
    assert leases.holder(zs, "features/train/stats") is None
    assert not (tmp_path / "store.zarr" / "_leases").exists()  # no empty folders left in the store
    assert second.acquire()
    second.release()


def test_scopes_are_independent_even_when_nested(zs):
    outer, inner = leases.Lease(zs, "train/abc"), leases.Lease(zs, "train/abc/def")
    assert inner.acquire()
    assert leases.holder(zs, "train/abc") is None
    assert outer.acquire()
    outer.release()
    inner.release()


def test_a_generation_deleted_between_listing_and_reading_is_not_nobody(zs, monkeypatch):
    """The interleaving behind a flaky two-winner race: a racer lists an expired generation 0; before it reads
    it, another takes generation 1 and deletes 0. The racer must see the new holder, not "nobody" (which
    would let it take generation 0 again beside the new holder)."""
    dead = leases.Lease(zs, "s", ttl=0.01)
    assert dead.acquire()
    dead._stop.set()
    time.sleep(0.05)
    winner, real_read = leases.Lease(zs, "s"), leases._read

    def late(zstore, key):
        monkeypatch.setattr(leases, "_read", real_read)
        assert winner.acquire() and winner.generation == 1  # generation 0 is deleted now
        return real_read(zstore, key)

    monkeypatch.setattr(leases, "_read", late)
    loser = leases.Lease(zs, "s")
    assert not loser.acquire()
    assert loser.holder.generation == 1 and loser.holder.token == winner.token
    winner.release()


def test_exactly_one_winner_when_many_race_for_a_free_or_expired_scope(zs):
    for round_ in range(15):
        scope = f"race/{round_}"
        if round_ % 2:  # an expired lease left by a dead holder: the racers all try its next generation
            dead = leases.Lease(zs, scope, ttl=0.01)
            assert dead.acquire()
            dead._stop.set()
            time.sleep(0.05)
        won = race_for_lease(zs, scope, 8)
        assert len(won) == 1, f"round {round_}: {len(won)} winners"
        assert leases.holder(zs, scope).token == won[0].token
        won[0].release()


def test_renewal_keeps_a_lease_past_its_ttl(zs):
    lease = leases.Lease(zs, "long", ttl=0.3)
    assert lease.acquire()
    time.sleep(0.8)
    assert not leases.Lease(zs, "long").acquire()
    lease.release()


def test_a_killed_holder_on_this_machine_is_taken_over_at_once(tmp_path, zs):
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from pipeline import leases; "
              "from pipeline.store import zarr_store; l = leases.Lease(zarr_store(sys.argv[2]), 'materialize'); "
              "assert l.acquire(); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", script, str(ROOT), str(tmp_path / "store.zarr")], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        assert not leases.Lease(zs, "materialize").acquire()  # alive
    finally:
        child.kill()  # SIGKILL: no release, no clean-up
        child.wait()
    lease = leases.Lease(zs, "materialize")
    assert lease.acquire() and lease.generation == 1  # its pid is gone: no need to wait out the 60 s ttl
    lease.release()


def test_a_silent_holder_elsewhere_is_taken_over_after_its_ttl(zs):
    record = {"by": "bob@elsewhere", "host": "elsewhere", "pid": 1, "token": "t", "since": time.time(), "expires": time.time() + 1.0}
    assert leases._write(zs, leases._key("materialize", 0), record, exclusive=True)
    assert not leases.Lease(zs, "materialize").acquire()  # another machine: its pid says nothing here
    started = time.time()
    lease = leases.take(zs, "materialize", poll=0.1)
    assert 0.5 < time.time() - started < 5 and lease.generation == 1
    lease.release()


def test_a_holder_that_stalled_past_its_ttl_learns_it_lost(zs):
    slow = leases.Lease(zs, "x", ttl=0.2)
    assert slow.acquire()
    slow._stop.set()  # stalls: stops renewing
    time.sleep(0.3)
    quick = leases.Lease(zs, "x")
    assert quick.acquire() and quick.generation == 1
    slow.renew()
    assert slow.lost
    slow.release()  # must not delete the new holder's lease
    assert leases.holder(zs, "x").token == quick.token
    quick.release()


def test_leases_live_in_the_zarr_store_of_a_group(tmp_path):
    root = zarr.create_group(store=str(tmp_path / "g.zarr"), zarr_format=3)
    with leases.take(root.store, "train/0123"):
        assert "train/0123" in leases.active_holders(root.store)
    assert leases.active_holders(root.store) == {}
