"""One writer per flow: a lease in the state database, renewed while its holder works.

Every path that writes a flow (a Dagster run, ``crm-assets sync``, ``sync_once``)
holds the flow's lease from before it reads what it plans from until its last
write. A second writer waits a bounded time, then stops with one line naming
the holder and since when, having written nothing. A holder that died (kill -9)
stops renewing; its lease expires and the next writer takes it over.

The lease is one row per flow, taken with a conditional UPDATE (or an INSERT
for a flow never leased), which is atomic on SQLite and PostgreSQL alike.
Times are UTC epoch seconds as the state database's host sees them: only the
sync hosts' clocks matter here, never a CRM's.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from crm_assets.engine.state import SyncState, leases

#: Seconds a lease lasts without renewal (``CRM_SYNC_LEASE_TTL``).
DEFAULT_TTL = 60.0
#: Seconds a second writer waits for the holder (``CRM_SYNC_LEASE_WAIT``).
DEFAULT_WAIT = 30.0


class LeaseHeld(RuntimeError):
    """Another live writer holds the flow; the message is one line for the operator."""


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds (or last held) a flow, and since when."""

    run_id: str | None
    holder: str | None
    acquired_at: float | None
    released_at: float | None


def holder_name(run_id: str, via: str) -> str:
    """How the message names a holder: the run, what started it, the process and host."""
    return f"run {run_id[:12]} ({via}, pid {os.getpid()} on {socket.gethostname()})"


def _clock(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%H:%M:%S UTC")


class FlowLease:
    """The lease of one flow for one run."""

    def __init__(
        self,
        state: SyncState,
        flow: str,
        run_id: str,
        holder: str,
        ttl: float = DEFAULT_TTL,
    ) -> None:
        self.state, self.flow, self.run_id, self.holder, self.ttl = (
            state,
            flow,
            run_id,
            holder,
            ttl,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: when the previous holder released the flow (its writes are then in the CRMs)
        self.previous_release: float | None = None

    # -- taking and giving back ----------------------------------------------------------
    def _try(self) -> LeaseInfo | None:
        """Take the lease if it is free, expired or already ours; else who holds it."""
        t = time.time()
        values = {
            "run_id": self.run_id,
            "holder": self.holder,
            "acquired_at": t,
            "expires_at": t + self.ttl,
            "released_at": None,
        }
        with self.state.engine.begin() as conn:
            row = conn.execute(sa.select(leases).where(leases.c.flow == self.flow)).first()
            if row is None:
                try:
                    conn.execute(leases.insert().values(flow=self.flow, **values))
                except sa.exc.IntegrityError:
                    return LeaseInfo(None, "another writer (just now)", t, None)
                return None
            free = (leases.c.expires_at <= t) | (leases.c.run_id == self.run_id)
            taken = conn.execute(
                leases.update().where((leases.c.flow == self.flow) & free).values(**values)
            )
            if taken.rowcount == 1:
                # held when read but released before the update: it was released just now
                still_held = row.released_at is None and row.run_id != self.run_id
                self.previous_release = t if still_held else row.released_at
                return None
            return LeaseInfo(row.run_id, row.holder, row.acquired_at, row.released_at)

    def acquire(self, wait: float = DEFAULT_WAIT, poll: float = 0.25) -> None:
        """Take the lease, waiting at most ``wait`` seconds; raises :class:`LeaseHeld`."""
        deadline = time.monotonic() + wait
        while True:
            held = self._try()
            if held is None:
                break
            if time.monotonic() >= deadline:
                since = _clock(held.acquired_at) if held.acquired_at else "a moment ago"
                raise LeaseHeld(
                    f"flow {self.flow} is being synced by {held.holder} since {since}; "
                    f"waited {wait:g} s and wrote nothing (try again when it finishes, or "
                    f"raise CRM_SYNC_LEASE_WAIT)"
                )
            time.sleep(poll)
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"lease-{self.flow}", daemon=True
        )
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            if not self.renew():
                return

    def renew(self) -> bool:
        """Push the expiry out; False when the lease is no longer ours (it expired and was
        taken over: the holder must stop writing)."""
        t = time.time()
        with self.state.engine.begin() as conn:
            done = conn.execute(
                leases.update()
                .where((leases.c.flow == self.flow) & (leases.c.run_id == self.run_id))
                .values(expires_at=t + self.ttl)
            )
        return done.rowcount == 1

    def release(self) -> None:
        """Give the flow back: the next writer may take it at once."""
        self._stop.set()
        t = time.time()
        with self.state.engine.begin() as conn:
            conn.execute(
                leases.update()
                .where((leases.c.flow == self.flow) & (leases.c.run_id == self.run_id))
                .values(expires_at=t, released_at=t)
            )


def lease_info(state: SyncState, flow: str) -> LeaseInfo | None:
    """The flow's lease row, if it was ever leased."""
    with state.engine.connect() as conn:
        row = conn.execute(sa.select(leases).where(leases.c.flow == flow)).first()
    return (
        None if row is None else LeaseInfo(row.run_id, row.holder, row.acquired_at, row.released_at)
    )


# -- leases a process holds across the steps of one run (Dagster runs a flow in steps) --------
_HELD: dict[tuple[str, str], FlowLease] = {}
_HELD_LOCK = threading.Lock()


def hold(lease: FlowLease, wait: float = DEFAULT_WAIT) -> FlowLease:
    """Acquire ``lease`` and keep it for later steps of the same run in this process."""
    lease.acquire(wait)
    with _HELD_LOCK:
        _HELD[(lease.flow, lease.run_id)] = lease
    return lease


def is_held(flow: str, run_id: str) -> bool:
    """Whether this process holds the flow's lease for the run."""
    with _HELD_LOCK:
        return (flow, run_id) in _HELD


def release_held(run_id: str | None, flow: str | None = None) -> int:
    """Release what this process holds for a run (``None``: every run), one flow or all."""
    with _HELD_LOCK:
        keys = [k for k in _HELD if run_id in (None, k[1]) and (flow is None or k[0] == flow)]
        held = [_HELD.pop(k) for k in keys]
    for lease in held:
        lease.release()
    return len(held)


@atexit.register
def _release_at_exit() -> None:
    """A process that ends before its run's resources are torn down (its pod stopped, a
    script holding a flow stopped with Ctrl-C) gives its flows back as it exits, not when
    the leases expire under the next run's feet. Best effort: an unreachable state
    database leaves that to the expiry."""
    with contextlib.suppress(sa.exc.SQLAlchemyError):
        release_held(None)
