"""SQLite persistence shared by both embedded CRMs.

Each object type is one table holding the rendered JSON document of a record next to the
few columns the API filters and orders on, so a page of 1,000 records is one indexed range
scan plus a string join (no per-record JSON round trip). Every write runs under one process
lock, and the timestamp is taken inside that lock: commits happen in timestamp order, which
is what keeps modified-since / keyset paging from ever skipping a record.

Stamps are read from the service's :class:`~crm_assets.embedded.clock.Clock`, so they
follow its offset (the clock fault), but never go backwards: after the offset is moved
back, stamps hold just after the newest one until the clock passes it again.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from crm_assets.embedded.clock import Clock

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def format_us(us: int) -> str:
    """Render epoch microseconds as fixed-width RFC 3339 UTC (string order == time order)."""
    return (_EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(value: str) -> str:
    """Normalise an RFC 3339 timestamp to the stored fixed-width UTC form.

    Raises ``ValueError`` for anything that is not a date-time. A value without an offset is
    read as UTC, which is what a client that forgot the ``Z`` almost always meant.
    """
    text = value.strip()
    if len(text) < 10:
        raise ValueError("not an RFC 3339 date-time")
    if text.endswith(("z", "Z")):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        parsed = parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError("date-time out of range") from None
    return parsed.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class StampClock:
    """Strictly increasing UTC microsecond stamps read from ``source`` (the service clock).

    Two writes never share a timestamp, and a stamp never goes back behind one already
    stored (clock skew, restored data, an offset moved back).
    """

    def __init__(self, source: Clock, last_us: int = 0) -> None:
        self.source = source
        self._last = last_us

    def advance_to(self, us: int) -> None:
        """Never go back behind a timestamp already stored (clock skew, restored data)."""
        self._last = max(self._last, us)

    def forget(self) -> None:
        """Nothing is stored any more (a wipe): the next stamp is the clock's own."""
        self._last = 0

    def next_us(self) -> int:
        now = self.source.time_ns() // 1000
        self._last = now if now > self._last else self._last + 1
        return self._last

    def next(self) -> str:
        return format_us(self.next_us())


def _to_us(stamp: str) -> int:
    parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    delta = parsed - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def record_table(metadata: sa.MetaData, name: str) -> sa.Table:
    """One object type: id, ordering columns, the reference it holds, the JSON document."""
    table = sa.Table(
        name,
        metadata,
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("modified", sa.String, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False, default=False),
        sa.Column("ref", sa.String, nullable=True),
        sa.Column("doc", sa.Text, nullable=False),
        sqlite_with_rowid=True,
    )
    sa.Index(f"ix_{name}_modified_id", table.c.modified, table.c.id)
    sa.Index(f"ix_{name}_ref", table.c.ref)
    return table


class Store:
    """The SQLite database of one embedded CRM, with its write lock and clock.

    ``clock`` is the service's clock (its own when not given); ``self.clock`` stamps writes.
    """

    def __init__(
        self, data_dir: Path, filename: str, objects: Sequence[str], clock: Clock | None = None
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / filename
        self.engine: Engine = sa.create_engine(
            f"sqlite:///{self.path}",
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=20,
            max_overflow=20,
        )
        sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self.metadata = sa.MetaData()
        self.tables: dict[str, sa.Table] = {
            name: record_table(self.metadata, name) for name in objects
        }
        self.counters = sa.Table(
            "counters",
            self.metadata,
            sa.Column("name", sa.String, primary_key=True),
            sa.Column("value", sa.Integer, nullable=False),
        )
        self.idempotency = sa.Table(
            "idempotency_keys",
            self.metadata,
            sa.Column("obj", sa.String, primary_key=True),
            sa.Column("key", sa.String, primary_key=True),
            sa.Column("record_id", sa.String, nullable=False),
            sa.Column("created", sa.String, nullable=False),
        )
        self.tokens = sa.Table(
            "tokens",
            self.metadata,
            sa.Column("token_hash", sa.String, primary_key=True),
            sa.Column("expires_at", sa.Float, nullable=False),
        )
        self.metadata.create_all(self.engine)
        self.lock = threading.RLock()
        self.service_clock = clock or Clock()
        self.clock = StampClock(self.service_clock)
        with self.engine.connect() as conn:
            for table in self.tables.values():
                latest = conn.execute(sa.select(sa.func.max(table.c.modified))).scalar()
                if latest:
                    self.clock.advance_to(_to_us(latest))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction under the process lock (timestamps are allocated inside it)."""
        with self.lock, self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only connection; WAL lets it run beside a writer."""
        with self.engine.connect() as conn:
            yield conn

    def next_id_number(self, conn: Connection, name: str, start: int = 1) -> int:
        """Allocate the next number of a persistent counter (ids are never reused)."""
        current = conn.execute(
            sa.select(self.counters.c.value).where(self.counters.c.name == name)
        ).scalar()
        if current is None:
            value = start
            conn.execute(sa.insert(self.counters).values(name=name, value=value))
        else:
            value = current + 1
            conn.execute(
                sa.update(self.counters).where(self.counters.c.name == name).values(value=value)
            )
        return value

    def set_counter(self, conn: Connection, name: str, value: int) -> None:
        conn.execute(sa.delete(self.counters).where(self.counters.c.name == name))
        conn.execute(sa.insert(self.counters).values(name=name, value=value))

    def is_empty(self) -> bool:
        with self.read() as conn:
            for table in self.tables.values():
                if conn.execute(sa.select(table.c.id).limit(1)).first() is not None:
                    return False
            return conn.execute(sa.select(self.counters.c.name).limit(1)).first() is None

    def wipe(self) -> None:
        """Delete every record, counter and idempotency key (tokens survive: not data)."""
        with self.write() as conn:
            for table in self.tables.values():
                conn.execute(sa.delete(table))
            conn.execute(sa.delete(self.counters))
            conn.execute(sa.delete(self.idempotency))
            self.clock.forget()  # no stamp left to stay ahead of

    def bulk_insert(self, conn: Connection, obj: str, rows: Iterable[dict[str, Any]]) -> None:
        """Insert prepared rows (seeding); advances the clock past their timestamps."""
        table = self.tables[obj]
        sql = f"INSERT INTO {table.name} (id, modified, version, deleted, ref, doc) VALUES (?, ?, ?, ?, ?, ?)"
        batch: list[tuple[Any, ...]] = []
        for row in rows:
            batch.append(
                (row["id"], row["modified"], row["version"], row["deleted"], row["ref"], row["doc"])
            )
            if len(batch) >= 10_000:
                conn.exec_driver_sql(sql, batch)
                batch = []
        if batch:
            conn.exec_driver_sql(sql, batch)
        latest = conn.execute(sa.select(sa.func.max(table.c.modified))).scalar()
        if latest:
            self.clock.advance_to(_to_us(latest))

    # -- idempotency keys -------------------------------------------------------------------
    def idempotent_record(self, conn: Connection, obj: str, key: str) -> str | None:
        table = self.idempotency
        return conn.execute(
            sa.select(table.c.record_id).where(table.c.obj == obj, table.c.key == key)
        ).scalar()

    def remember_key(self, conn: Connection, obj: str, key: str, record_id: str, now: str) -> None:
        conn.execute(
            sa.insert(self.idempotency).values(obj=obj, key=key, record_id=record_id, created=now)
        )

    # -- bearer tokens (expiry on the real clock, see crm_assets.embedded.clock) ------------
    def save_token(self, token: str, expires_at: float) -> None:
        with self.write() as conn:
            now = self.service_clock.real_time()
            conn.execute(sa.delete(self.tokens).where(self.tokens.c.expires_at < now))
            conn.execute(
                sa.insert(self.tokens).values(token_hash=token_hash(token), expires_at=expires_at)
            )

    def load_tokens(self) -> dict[str, float]:
        with self.read() as conn:
            rows = conn.execute(
                sa.select(self.tokens.c.token_hash, self.tokens.c.expires_at).where(
                    self.tokens.c.expires_at >= self.service_clock.real_time()
                )
            ).all()
        return {row.token_hash: row.expires_at for row in rows}


def token_hash(token: str) -> str:
    """Tokens are stored and compared hashed only: the database never holds a usable secret."""
    return hashlib.sha256(token.encode()).hexdigest()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
