"""The sync state database: links with their base values, create intents, dead letters,
audit log, flow settings and cursors, through SQLAlchemy Core.

SQLite by default, PostgreSQL by URL. Every write is one transaction. Base
values are stored per link as JSON, with a 64-bit digest of them (:func:`values_digest`):
a full plan loads every link with its digest only, and the values of the few pairs
whose records no longer hash like their base. A flow's links load without a Python
object per row (SQLite aggregates them into a few texts, PostgreSQL answers in Arrow
through ADBC) and their bases decode as one NDJSON document, in parallel.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import statistics
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from crm_assets.engine.link_copies import REFRESH_SHARE, LinkCopies
from crm_assets.engine.storage import Storage

#: 2: links keep their base's digest (``base_hash``)
#: 3: tombstoned links keep the side their record was deleted on (``deleted_side``)
#: 4: links keep the number of the write that saved them (``seq``, see ``counters``)
SCHEMA_VERSION = 4

#: Tries at creating the schema (a concurrent creator makes the first fail).
MIGRATE_ATTEMPTS = 5

#: Clock readings kept per CRM (their median is the CRM's offset).
CLOCK_SAMPLES = 7

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version", metadata, sa.Column("version", sa.Integer, primary_key=True)
)

flows = sa.Table(
    "flows",
    metadata,
    sa.Column("flow", sa.String(200), primary_key=True),
    sa.Column("enabled_at", sa.DateTime(timezone=True), nullable=False),
)

links = sa.Table(
    "links",
    metadata,
    sa.Column("flow", sa.String(200), primary_key=True),
    sa.Column("a_id", sa.String(200), primary_key=True),
    sa.Column("b_id", sa.String(200), nullable=False),
    sa.Column("tombstoned", sa.Boolean, nullable=False, default=False),
    sa.Column("base", sa.Text, nullable=True),  # JSON of canonical values; null: no base yet
    # values_digest of the base as a signed 64-bit integer; null: not known (written before
    # schema 2), so the plan reads the base itself
    sa.Column("base_hash", sa.BigInteger, nullable=True),
    # where the record of a tombstoned link was deleted: a, b or both; null: not known
    # (tombstoned before schema 3), read as deleted on both sides
    sa.Column("deleted_side", sa.String(4), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # the number of the write that saved the link (``counters``); null: before schema 4
    sa.Column("seq", sa.BigInteger, nullable=True),
    sa.UniqueConstraint("flow", "b_id", name="uq_links_flow_b"),
    # an incremental plan reads the links changed since the last one (links_changed_since)
    sa.Index("ix_links_flow_updated", "flow", "updated_at"),
    # a flow's copy reads the links written since it (link_copies)
    sa.Index("ix_links_flow_seq", "flow", "seq"),
)

#: ``links``: the number of the last write of links, which each write takes one above in
#: its own transaction (its row stays locked until it commits, so writes commit in their
#: numbers' order); ``database``: a random number drawn when the database was made.
counters = sa.Table(
    "counters",
    metadata,
    sa.Column("name", sa.String(40), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)

intents = sa.Table(
    "intents",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("flow", sa.String(200), nullable=False),
    sa.Column("side", sa.String(1), nullable=False),  # where the record is created
    sa.Column("source_id", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | done
    sa.Column("result_id", sa.String(200), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_intents_pending", "flow", "side", "source_id", "status"),
)

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("flow", sa.String(200), primary_key=True),
    sa.Column("side", sa.String(1), primary_key=True),  # the side written to
    sa.Column("record_id", sa.String(200), primary_key=True),
    sa.Column("action", sa.String(16), primary_key=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("flow", sa.String(200), nullable=False),
    sa.Column(
        "kind", sa.String(16), nullable=False
    ),  # create | update | delete | conflict | link | tombstone
    sa.Column("side", sa.String(1), nullable=True),  # the side written to
    sa.Column("a_id", sa.String(200), nullable=True),
    sa.Column("b_id", sa.String(200), nullable=True),
    sa.Column("field", sa.String(200), nullable=True),
    sa.Column("old_value", sa.Text, nullable=True),
    sa.Column("new_value", sa.Text, nullable=True),
    sa.Column("note", sa.Text, nullable=True),
    sa.Index("ix_audit_flow_ids", "flow", "a_id"),
)

flow_syncs = sa.Table(
    "flow_syncs",
    metadata,
    sa.Column("flow", sa.String(200), primary_key=True),
    sa.Column("first_completed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_completed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_run_id", sa.String(64), nullable=False),
)

state_meta = sa.Table(
    "state_meta",
    metadata,
    sa.Column("key", sa.String(100), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

own_writes = sa.Table(
    "own_writes",
    metadata,
    sa.Column("system", sa.String(100), primary_key=True),
    sa.Column("obj", sa.String(100), primary_key=True),
    sa.Column("record_id", sa.String(200), primary_key=True),
    sa.Column("stamp", sa.String(40), nullable=False),  # modification time, see stamp_key
    sa.Column("at", sa.Float, nullable=False),  # epoch seconds on the sync host
)

clock_samples = sa.Table(
    "clock_samples",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("system", sa.String(100), nullable=False),
    sa.Column("offset_seconds", sa.Float, nullable=False),  # CRM clock minus the sync host's
    sa.Index("ix_clock_samples_system", "system", "seq"),
)

leases = sa.Table(
    "leases",
    metadata,
    sa.Column("flow", sa.String(200), primary_key=True),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("holder", sa.String(300), nullable=False),
    sa.Column("acquired_at", sa.Float, nullable=False),  # epoch seconds (sync host's clock)
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("released_at", sa.Float, nullable=True),  # null while held
)

cursors = sa.Table(
    "cursors",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


@functools.cache
def schema_fingerprint() -> int:
    """A number that changes with the schema version and with any table, column or index
    of :data:`metadata`: the ``schema`` counter a migration leaves, so that a state opened
    again skips checking what the last migration made (:meth:`SyncState.migrate`)."""
    dialect = sqlite.dialect()
    ddl = [f"version {SCHEMA_VERSION}"]
    for table in metadata.sorted_tables:
        ddl.append(str(sa.schema.CreateTable(table).compile(dialect=dialect)))
        ddl += sorted(str(sa.schema.CreateIndex(i).compile(dialect=dialect)) for i in table.indexes)
    return int.from_bytes(hashlib.sha256("\n".join(ddl).encode()).digest()[:8]) >> 1


#: ``Date`` headers have whole seconds: an offset within this is noise, read as none, so
#: that it never reorders edits made less than a second apart on a host in step.
CLOCK_RESOLUTION_SECONDS = 2.0


def significant(offset: float | None) -> float:
    """A measured clock offset, with what the ``Date`` header's resolution cannot tell as 0."""
    return 0.0 if offset is None or abs(offset) < CLOCK_RESOLUTION_SECONDS else offset


#: How long the sync remembers its own writes (the sensors look at them within minutes).
OWN_WRITES_SECONDS = 24 * 3600


def stamp_key(text: str) -> str:
    """A modification time as the sensors compare it: UTC with microseconds."""
    moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def now() -> datetime:
    return datetime.now(UTC)


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def values_digest(values: pl.DataFrame) -> pl.Series:
    """One 64-bit hash per row of canonical values: a pair whose two records hash like its
    base changed nothing since the last sync (a collision would hide a change with odds of
    about 2^-64 per pair)."""
    return values.hash_rows()


def columns_digest(frame: pl.DataFrame, columns: Sequence[str]) -> pl.Series:
    """:func:`values_digest` of these columns of each row (names aside: only values hash);
    a flow with no property rows hashes every record alike, as zero."""
    if not columns:
        return pl.zeros(frame.height, pl.UInt64, eager=True)
    return values_digest(frame.select(columns))


def _read_bases(text: str | bytes, columns: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """Bases as NDJSON lines (``{}`` for none), typed as the flow's canonical columns."""
    return pl.read_ndjson(text.encode() if isinstance(text, str) else text, schema=dict(columns))


def _base_text(base: Mapping[str, Any]) -> str:
    """A base as stored: compact JSON (no spaces, UTF-8 as it is), as every load of the
    flow's links with their bases moves and decodes each byte of it (8 % fewer bytes than
    with ``json.dumps``' defaults, for the benchmark's contacts)."""
    return json.dumps(
        {k: _json(v) for k, v in base.items()}, separators=(",", ":"), ensure_ascii=False
    )


def _stored_bases(
    bases: Sequence[Mapping[str, Any] | None], columns: Mapping[str, pl.DataType]
) -> list[tuple[str | None, int | None]]:
    """Each base as stored: its JSON text and the digest of its values as a plan reads them
    back (decoded as ``columns``), as a signed 64-bit integer."""
    texts = [None if b is None else _base_text(b) for b in bases]
    present = [t for t in texts if t is not None]
    if columns and present:
        digests = values_digest(_read_bases("\n".join(present), columns))
        found = iter(digests.reinterpret(signed=True).to_list())
    else:  # a flow without property rows: every base hashes as zero, as its plan reads them
        found = iter([0] * len(present))
    return [(t, None if t is None else next(found)) for t in texts]


#: The columns of a link as :meth:`SyncState.links` gives it, before its base's.
LINK_KEYS = ("a_id", "b_id", "tombstoned", "has_base", "base_hash")

#: A link as read (from PostgreSQL): the base, when asked for, is its JSON text ("{}" when
#: the link has none yet).
LINK_SCHEMA: dict[str, pl.DataType] = {
    "a_id": pl.String(),
    "b_id": pl.String(),
    "tombstoned": pl.Boolean(),
    "has_base": pl.Boolean(),
    "base_hash": pl.Int64(),
    "base": pl.String(),
}


def _link_query(flow: str, with_base: bool) -> tuple[sa.Select, dict[str, pl.DataType]]:
    """A flow's links and their schema: ``LINK_SCHEMA``, without ``base`` unless
    ``with_base``."""
    has_base = links.c.base.is_not(None)
    base = [sa.func.coalesce(links.c.base, "{}")] if with_base else []
    query = sa.select(
        links.c.a_id, links.c.b_id, links.c.tombstoned, has_base, links.c.base_hash, *base
    ).where(links.c.flow == flow)
    schema = LINK_SCHEMA if with_base else {k: v for k, v in LINK_SCHEMA.items() if k != "base"}
    return query, schema


#: Idle ADBC connections kept per database (:class:`ArrowConnections`); more are closed.
ARROW_IDLE = 4


class ArrowConnections:
    """ADBC (Arrow) connections to a PostgreSQL state, each kept open for the next query:
    opening one costs 50 to 80 ms (the driver reads the server's type catalogue), a plan
    asks several queries, and each step of a run opens the state anew, so they are kept
    per database for the process (:meth:`of`), up to :data:`ARROW_IDLE` idle. They run in
    autocommit, so an idle one holds no snapshot.

    Not for SQLite: its ADBC driver links a second SQLite library into the process, and
    two SQLite libraries on one file do not see each other's locks (sqlite.org, "How To
    Corrupt"); tried, it failed with "disk I/O error". SQLite has :func:`_sqlite_links`."""

    _kept: ClassVar[dict[str, ArrowConnections]] = {}
    _kept_lock = threading.Lock()

    def __init__(self, uri: str) -> None:
        self._uri = uri
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    @classmethod
    def of(cls, url: sa.URL) -> ArrowConnections:
        """The process's connections to the database at ``url``."""
        uri = url.set(drivername="postgresql").render_as_string(hide_password=False)
        with cls._kept_lock:
            if uri not in cls._kept:
                cls._kept[uri] = cls(uri)
            return cls._kept[uri]

    @classmethod
    def close_all(cls) -> None:
        """Close every database's idle connections (the process's end)."""
        with cls._kept_lock:
            kept = list(cls._kept.values())
        for connections in kept:
            connections.close()

    def _take(self) -> Any | None:
        with self._lock:
            if self._pid != os.getpid():  # a forked process: the sockets are its parent's
                self._idle, self._pid = [], os.getpid()
            return self._idle.pop() if self._idle else None

    def fetch(self, sql: str, params: Sequence[Any]) -> pl.DataFrame:
        """The rows of one statement; a kept connection the server has closed since (a
        restart, an idle timeout) is dropped and the statement asked again on a new one."""
        import adbc_driver_postgresql.dbapi as postgresql_adbc

        kept = self._take()
        if kept is not None:
            try:
                return self._ask(kept, sql, params)
            except postgresql_adbc.Error:
                pass  # that connection is closed; asked again below
        return self._ask(postgresql_adbc.connect(self._uri, autocommit=True), sql, params)

    def _ask(self, conn: Any, sql: str, params: Sequence[Any]) -> pl.DataFrame:
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql, params)
                found = pl.DataFrame(cursor.fetch_arrow())
        except BaseException:
            conn.close()
            raise
        with self._lock:
            keep = len(self._idle) < ARROW_IDLE
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()
        return found

    def close(self) -> None:
        """Close the idle connections (a state's ``dispose``, the process's end)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle if self._pid == os.getpid() else ():
            conn.close()


atexit.register(ArrowConnections.close_all)

#: How a query is written for the ADBC PostgreSQL driver (numbered placeholders).
ADBC_DIALECT = postgresql.dialect(paramstyle="numeric_dollar")

#: Rows of the links table (by rowid, any flow), or ids asked for, per statement: SQLite's
#: aggregated texts (:func:`_sqlite_links`) stay far below its 1 GB limit.
LINK_CHUNK = 500_000


def _sqlite_link_texts(with_base: bool, where: str) -> sa.TextClause:
    """One statement's links as a few texts (the bases only when asked: their aggregate
    costs a fifth of the pass even when it gathers nothing): the ids as JSON arrays, the
    integers as plain lists, each link's two flags as one number, a digest not known as an
    empty item (1M links: 0.29 s for the integers' part against 0.36 s as three JSON
    arrays)."""
    bases = "CAST(group_concat(coalesce(base, '{}'), char(10)) AS BLOB)" if with_base else "NULL"
    return sa.text(f"""
        SELECT json_group_array(a_id), json_group_array(b_id),
               group_concat(tombstoned + 2 * (base IS NOT NULL)),
               group_concat(coalesce(base_hash, '')), {bases}, count(*)
        FROM links {where}
    """)


#: A range of the table in rowid order: one sequential pass.
_SQLITE_LINK_RANGE = "NOT INDEXED WHERE flow = :flow AND rowid > :after AND rowid <= :until"
#: A flow's links found through its index: for a flow with a small share of the table (the
#: products beside a million contacts), where the pass over every row costs 25 times more.
_SQLITE_LINK_FLOW = "WHERE flow = :flow"
#: A flow's links, counted up to ``:limit`` through the index: cheap whatever the flow's size.
_SQLITE_FLOW_AT_LEAST = sa.text(
    "SELECT count(*) FROM (SELECT 1 FROM links WHERE flow = :flow LIMIT :limit)"
)
#: Below this share of the table's rows, a flow's links are read through the index (a row
#: found through it costs about 4 times a row of the sequential pass).
SQLITE_INDEXED_SHARE = 0.25
#: The links written after a given write (:meth:`SyncState.links` with a copy).
_SQLITE_LINKS_SINCE = "WHERE flow = :flow AND seq > :since"
#: The links of some ids (a JSON array), each found through the index on it.
_SQLITE_LINKS_OF = {
    column: f"WHERE flow = :flow AND {column} IN (SELECT value FROM json_each(:ids))"
    for column in ("a_id", "b_id")
}


def _chunks(values: Sequence[str], size: int) -> list[str]:
    """``values`` as JSON arrays of at most ``size``: each one parameter of one statement,
    which the database unpacks (PostgreSQL took 12.9 s for 99k ids as 20 statements of
    5,000 placeholders each, 0.9 s as one array)."""
    return [
        json.dumps(list(values[start : start + size]), ensure_ascii=False)
        for start in range(0, len(values), size)
    ]


def _one_of(column: sa.Column, array: str) -> sa.ColumnElement[bool]:
    """``column`` is one of the texts of a JSON array (one bound parameter), in PostgreSQL:
    ``= ANY(ARRAY(...))`` walks the index in order (99k of 900k links with their bases:
    0.8 to 1.0 s, against 1.4 s for ``IN (SELECT ...)``, which it plans as 99k lookups)."""
    texts = sa.select(sa.func.json_array_elements_text(sa.cast(sa.literal(array), postgresql.JSON)))
    return column == sa.any_(sa.func.array(texts.scalar_subquery()))


#: Statements of one read that SQLite answers at once, each on a connection of its own: it
#: answers a statement on one core, and Python's driver lets go of the GIL meanwhile
#: (900k links with digests, 2 cores: 0.98 s as one statement, 0.51 s as two at once).
SQLITE_READERS = max(1, min(4, os.cpu_count() or 1))
#: Below this many rows or ids a read stays one statement: another costs more than it saves.
SQLITE_SPLIT_MIN = 50_000


def _per_statement(total: int) -> int:
    """Rows or ids per statement of a read of ``total``: a share of each reader, at most
    :data:`LINK_CHUNK`."""
    readers = SQLITE_READERS if total >= SQLITE_SPLIT_MIN else 1
    return max(1, min(LINK_CHUNK, -(-total // readers)))


def _sqlite_links(
    engine: sa.Engine,
    flow: str,
    with_base: bool,
    ids: tuple[str, Sequence[str]] | None = None,
    since: int | None = None,
) -> list[tuple[pl.DataFrame, bytes]]:
    """A flow's links from SQLite (all, those whose ``ids[0]`` column is one of ``ids[1]``,
    or those written after write ``since``) as ``(keys, bases)`` chunks, each one statement
    whose columns come back as a few long texts (JSON arrays; the bases as NDJSON lines, as
    bytes: never decoded into a Python string), so no row ever becomes a Python object. A
    file's statements run at once (:data:`SQLITE_READERS`), each in a read of its own, as
    the statements of one connection were: a flow's links change only under its lease."""
    if since is not None:
        statements = [(_SQLITE_LINKS_SINCE, {"since": since})]
    elif ids is None:
        with engine.connect() as conn:
            top = conn.execute(sa.text("SELECT max(rowid) FROM links")).scalar() or 0
            limit = min(int(top * SQLITE_INDEXED_SHARE), LINK_CHUNK)
            small = conn.execute(_SQLITE_FLOW_AT_LEAST, {"flow": flow, "limit": limit}).scalar()
        step = _per_statement(top)
        statements = (
            [(_SQLITE_LINK_FLOW, {})]
            if small < limit
            else [
                (_SQLITE_LINK_RANGE, {"after": after, "until": after + step})
                for after in range(0, top, step)
            ]
        )
    else:
        column, values = ids
        statements = [
            (_SQLITE_LINKS_OF[column], {"ids": chunk})
            for chunk in _chunks(values, _per_statement(len(values)))
        ]

    def answer(where: str, params: dict[str, Any]) -> tuple[pl.DataFrame, bytes]:
        statement = _sqlite_link_texts(with_base, where)
        with engine.connect() as conn:
            row = conn.execute(statement, {**params, "flow": flow}).one()
        a_ids, b_ids, flags, digests, bases, count = row
        if not count:
            return pl.DataFrame(), b""
        keys = (
            pl.DataFrame({"a_id": [a_ids], "b_id": [b_ids], "f": [flags], "d": [digests]})
            .select(
                pl.col("a_id", "b_id").str.json_decode(pl.List(pl.String)),
                pl.col("f", "d").str.split(","),
            )
            .explode(pl.all())
            .with_columns(pl.col("f").str.to_integer(dtype=pl.Int8))
            .select(
                "a_id",
                "b_id",
                tombstoned=pl.col("f") % 2 == 1,
                has_base=pl.col("f") >= 2,
                base_hash=pl.col("d").str.to_integer(strict=False),  # "": not known
            )
        )
        return keys, bases or b""

    # an in-memory database is one connection's own: its statements stay on it, in turn
    concurrent = len(statements) > 1 and isinstance(engine.pool, sa.pool.QueuePool)
    if concurrent:
        with ThreadPoolExecutor(min(SQLITE_READERS, len(statements))) as pool:
            found = list(pool.map(lambda statement: answer(*statement), statements))
    else:
        found = [answer(*statement) for statement in statements]
    return [(keys, bases) for keys, bases in found if keys.height]


def _split_bases(frame: pl.DataFrame) -> tuple[pl.DataFrame, str]:
    """Links read as rows (``LINK_SCHEMA``) as ``(keys, bases as NDJSON lines)``."""
    if "base" not in frame.columns:
        return frame, ""
    return frame.drop("base"), frame.select(pl.col("base").str.join("\n")).item() or ""


def _decode_links(
    chunks: Sequence[tuple[pl.DataFrame, str | bytes]], columns: Mapping[str, pl.DataType]
) -> pl.DataFrame:
    """Links with their base digests (``base_hash``, as :func:`values_digest` gives them;
    null where not known) and base values: each chunk's bases are one NDJSON document (a
    line per link, ``{}`` where it has none), which polars' JSON reader decodes in parallel."""
    empty = {key: LINK_SCHEMA[key] for key in LINK_KEYS}
    empty |= {f"base.{name}": dtype for name, dtype in columns.items()}
    frames = [pl.DataFrame(schema=empty)]
    for keys, bases in chunks:
        if columns:
            values = _read_bases(bases, columns)
            keys = keys.hstack(values.select(pl.all().name.prefix("base.")))
        frames.append(keys)
    found = pl.concat(frames, how="vertical_relaxed")
    return found.with_columns(pl.col("base_hash").reinterpret(signed=False))


class StateUnavailable(RuntimeError):
    """The state database cannot be opened: one line saying why, naming the setting."""


#: What fixes a state database that cannot be opened.
STATE_HINT = "check CRM_SYNC_STATE_URL; unset, the state is state.db in CRM_SYNC_DATA_DIR"


def _unavailable(url: str, exc: BaseException) -> StateUnavailable:
    """The one line for a state database that cannot be opened; never its password (a URL
    SQLAlchemy cannot parse is not repeated at all)."""
    if isinstance(exc, sa.exc.ArgumentError):
        shown, reason = "", "not a database URL SQLAlchemy can open"
    else:
        shown = " " + sa.make_url(url).render_as_string(hide_password=True)
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
    return StateUnavailable(f"cannot open the state database{shown}: {reason} ({STATE_HINT})")


#: PostgreSQL plans the state's queries by its statistics of each table, which autovacuum
#: refreshes up to a minute after a bulk change, and a new table has none: right after 900k
#: links were saved, the links changed since a time took 0.11 to 0.2 s instead of 0.004 s,
#: four small queries of a plan 0.27 s instead of 0.09 s. A state object that saved this
#: many links (and more than a tenth of what the statistics know) refreshes them itself.
ANALYZE_AFTER_LINKS = 10_000


_server_engines: dict[tuple[int, str], sa.Engine] = {}
_server_engines_lock = threading.Lock()


def _engine(url: str) -> sa.Engine:
    """The engine of a state database. A server's (PostgreSQL) is kept for the process,
    as SQLAlchemy advises: a new one connects and asks the server about itself, about
    10 ms that each step of a run paid again; its pool checks a connection before
    lending it, so a server restarted since costs no failed run. A SQLite file's is new
    each time: a kept one would go on reading a database file deleted since."""
    if sa.make_url(url).get_backend_name() == "sqlite":
        return sa.create_engine(url)
    key = (os.getpid(), url)  # a forked process does not share its parent's sockets
    with _server_engines_lock:
        if key not in _server_engines:
            _server_engines[key] = sa.create_engine(url, pool_pre_ping=True)
        return _server_engines[key]


class SyncState:
    """The state of every flow, in one SQL database.

    ``copies``: the folder of the flows' link copies (:mod:`link_copies`), if any: in
    the data folder, so that they follow it to S3."""

    def __init__(self, url: str, copies: Storage | None = None) -> None:
        try:
            if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine = _engine(url)
        except (OSError, sa.exc.ArgumentError) as exc:
            raise _unavailable(url, exc) from None
        self._arrow = (
            ArrowConnections.of(self.engine.url)
            if self.engine.url.get_backend_name() == "postgresql"
            else None
        )
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._unanalyzed = 0  # links saved since this object last refreshed the statistics
        self._copies = None if copies is None else LinkCopies(copies)
        self.migrate()

    def migrate(self) -> None:
        """Create the schema, or bring an older one up to date.

        Two syncs starting together on a new database both find tables missing and both
        create them; the slower one fails ("already exists" on SQLite, a unique violation
        in PostgreSQL's catalog) and tries again, then finds the schema whole."""
        for attempt in range(MIGRATE_ATTEMPTS):
            try:
                return self._migrate()
            except sa.exc.DBAPIError as exc:
                if attempt == MIGRATE_ATTEMPTS - 1:
                    url = self.engine.url.render_as_string(hide_password=False)
                    raise _unavailable(url, exc) from None
                time.sleep(0.05 * (attempt + 1))

    def _schema_current(self) -> bool:
        """Whether the database already holds this program's schema, by the one row its
        last migration left (:func:`schema_fingerprint`): checking each table, column and
        index costs 30 to 50 ms on PostgreSQL, and every step of a run opens the state."""
        query = sa.select(counters.c.value).where(counters.c.name == "schema")
        try:
            with self.engine.connect() as conn:
                return conn.execute(query).scalar() == schema_fingerprint()
        except sa.exc.DBAPIError:  # no counters table yet, or no database: migrate says why
            return False

    def _migrate(self) -> None:
        if self._schema_current():
            return
        with self.engine.begin() as conn:
            metadata.create_all(conn)
            found_columns = {c["name"] for c in sa.inspect(conn).get_columns("links")}
            # schema 1: its links' digests stay unknown (null) until they are saved again;
            # schema 2: its tombstones' deleted sides stay unknown
            # schema 3: its links' write numbers stay unknown, read only by full loads
            added = (("base_hash", "BIGINT"), ("deleted_side", "VARCHAR(4)"), ("seq", "BIGINT"))
            for name, ddl in added:
                if name not in found_columns:
                    conn.execute(sa.text(f"ALTER TABLE links ADD COLUMN {name} {ddl}"))
            for index in links.indexes:  # added since: create_all passes over existing tables
                index.create(conn, checkfirst=True)
            drawn = uuid.uuid4().int >> 65  # 63 bits
            number = {"name": "database", "value": drawn}
            conn.execute(self._insert(counters).values(number).on_conflict_do_nothing())
            found = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
            if found is None:
                conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
            elif found > SCHEMA_VERSION:
                shown = self.engine.url.render_as_string(hide_password=True)
                raise StateUnavailable(
                    f"the state database {shown} has schema {found}, newer than this "
                    f"release's {SCHEMA_VERSION}: a newer crm_assets migrated it (install "
                    f"that release, or set CRM_SYNC_STATE_URL to another database)"
                )
            elif found < SCHEMA_VERSION:
                # a program of schema 1 would save bases without their digests: it stops here
                conn.execute(schema_version.update().values(version=SCHEMA_VERSION))
                # links its programs wrote carry no write number: no copy made before is read
                renumber = counters.update().where(counters.c.name == "database")
                conn.execute(renumber.values(value=drawn))
            fingerprint = {"name": "schema", "value": schema_fingerprint()}
            self._upsert(conn, counters, [fingerprint], ("name",))

    def dispose(self) -> None:
        self.engine.dispose()
        if self._arrow is not None:
            self._arrow.close()

    def _refresh_statistics(self, saved: int) -> None:
        """After a bulk save (an initial sync, an import), PostgreSQL's statistics of the
        tables it grew, so the next plans use their indexes (:data:`ANALYZE_AFTER_LINKS`)."""
        if self.engine.dialect.name != "postgresql":
            return  # SQLite uses the indexes without statistics
        self._unanalyzed += saved
        if self._unanalyzed < ANALYZE_AFTER_LINKS:
            return
        with self.engine.begin() as conn:
            known = conn.execute(
                sa.select(sa.column("reltuples"))
                .select_from(sa.table("pg_class"))
                .where(sa.column("oid") == sa.cast(links.name, postgresql.REGCLASS))
            ).scalar()
            if known is not None and 10 * self._unanalyzed <= known:  # -1: never analyzed
                return  # autovacuum will see to a change this small next to the table
            conn.execute(sa.text(f"ANALYZE {links.name}, {intents.name}, {audit.name}"))
        self._unanalyzed = 0

    def _rows_in(self, query: sa.Select, column: sa.Column, values: Sequence[str]) -> list[Any]:
        """The rows of ``query`` whose ``column`` is one of ``values`` (in chunks, which
        keeps each statement under the databases' parameter limits)."""
        rows: list[Any] = []
        with self.engine.connect() as conn:
            for start in range(0, len(values), 5000):
                rows += conn.execute(query.where(column.in_(values[start : start + 5000]))).all()
        return rows

    def _insert(self, table: sa.Table) -> Any:
        """An INSERT of the database's own dialect (for its ON CONFLICT clauses)."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

    def _link_write(self, conn: sa.Connection) -> int:
        """The number of this transaction's write of links: one above the last, its row
        locked until the transaction ends, so writes commit in their numbers' order."""
        stmt = self._insert(counters).values(name="links", value=1)
        stmt = stmt.on_conflict_do_update(
            index_elements=["name"], set_={"value": counters.c.value + 1}
        ).returning(counters.c.value)
        return int(conn.execute(stmt).scalar_one())

    def link_writes(self) -> tuple[str, int]:
        """This database's number and the number of its last write of links (0: none):
        what a link copy is checked against (:mod:`link_copies`)."""
        with self.engine.connect() as conn:
            found = dict(conn.execute(sa.select(counters.c.name, counters.c.value)).all())
        return str(found["database"]), int(found.get("links", 0))

    def _upsert(
        self, conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]], keys: Sequence[str]
    ) -> None:
        if not rows:
            return
        stmt = self._insert(table)
        update = {c: stmt.excluded[c] for c in rows[0] if c not in keys}
        # one statement, the rows as its parameter sets: the driver's executemany (SQLAlchemy
        # batches them into multi-row statements where the driver is slow at that)
        conn.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=update), rows)

    # -- flows ---------------------------------------------------------------------------
    def enabled_at(self, flow: str) -> datetime:
        """When the flow was first synced (``limited`` mode creates only what is newer)."""
        with self.engine.begin() as conn:
            found = conn.execute(sa.select(flows.c.enabled_at).where(flows.c.flow == flow)).scalar()
            if found is None:
                found = now()
                conn.execute(flows.insert().values(flow=flow, enabled_at=found))
        return found if found.tzinfo else found.replace(tzinfo=UTC)

    def mark_synced(self, flow: str, run_id: str, plan_mark: str | None = None) -> None:
        """Record that a sync of the flow wrote everything it planned (its state is real);
        ``plan_mark``: what that plan read (the next plan starts from it)."""
        at = now()
        row = {
            "flow": flow,
            "first_completed_at": at,
            "last_completed_at": at,
            "last_run_id": run_id,
        }
        with self.engine.begin() as conn:
            done = conn.execute(
                flow_syncs.update()
                .where(flow_syncs.c.flow == flow)
                .values(last_completed_at=at, last_run_id=run_id)
            )
            if done.rowcount == 0:
                conn.execute(flow_syncs.insert().values(**row))
            if plan_mark is not None:
                mark = {"name": _plan_mark_cursor(flow), "value": plan_mark}
                self._upsert(conn, cursors, [mark], ("name",))

    def plan_mark(self, flow: str) -> str | None:
        """What the flow's last confirmed plan read, as :meth:`mark_synced` recorded it."""
        return self.cursor(_plan_mark_cursor(flow))

    def synced(self, flow: str) -> bool:
        """Whether a sync of the flow ever completed against this state database."""
        with self.engine.connect() as conn:
            query = sa.select(flow_syncs.c.flow).where(flow_syncs.c.flow == flow)
            return conn.execute(query).first() is not None

    def identity(self, **claim: str) -> dict[str, str]:
        """Who created this state database and when; ``claim`` records it the first time
        (e.g. ``data_dir``, ``instance``), so a state met from another place says so."""
        with self.engine.begin() as conn:
            found = dict(conn.execute(sa.select(state_meta.c.key, state_meta.c.value)).all())
            if not found and claim:
                found = {"created_at": now().isoformat(timespec="seconds"), **claim}
                conn.execute(
                    state_meta.insert(), [{"key": k, "value": v} for k, v in found.items()]
                )
        return found

    def has_links(self, flow: str) -> bool:
        with self.engine.connect() as conn:
            query = sa.select(links.c.a_id).where(links.c.flow == flow).limit(1)
            return conn.execute(query).first() is not None

    # -- links -----------------------------------------------------------------------------
    def links(self, flow: str, columns: Mapping[str, pl.DataType]) -> pl.DataFrame:
        """Every link of a flow: ``a_id, b_id, tombstoned, has_base, base.<column>``; from
        the flow's copy and the links written since it, where the state keeps copies."""
        if self._copies is None:
            return self._stored_links(flow, columns)
        database, counter = self.link_writes()  # first: a copy never misses a write below it
        copy = self._copies.read(flow, database, counter, columns)
        if copy is None:
            found = self._stored_links(flow, columns)
            self._copies.write(flow, database, counter, found)
            return found
        since = self._stored_links(flow, copy.layout, since=copy.generation)
        found = copy.frame
        if since.height:
            kept = found.filter(~pl.col("a_id").is_in(since.get_column("a_id").implode()))
            found = pl.concat([kept, since])
            if since.height > REFRESH_SHARE * found.height:
                self._copies.write(flow, database, counter, found)
        return found.select(*LINK_KEYS, *[f"base.{name}" for name in columns])

    def _stored_links(
        self, flow: str, columns: Mapping[str, pl.DataType], since: int | None = None
    ) -> pl.DataFrame:
        """A flow's links as the database holds them (those written after write ``since``
        only, when given)."""
        if self.engine.dialect.name == "sqlite":
            chunks = _sqlite_links(self.engine, flow, bool(columns), since=since)
        else:
            query, schema = _link_query(flow, bool(columns))
            query = query if since is None else query.where(links.c.seq > since)
            chunks = [_split_bases(self.frame(query, schema))]
        return _decode_links(chunks, columns)

    def frame(self, query: sa.Select, schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
        """The rows of ``query`` as a frame of ``schema``: from PostgreSQL as Arrow (its
        ADBC driver), so a million rows never become Python objects; from SQLite (small
        queries: its links have :func:`_sqlite_links`) through SQLAlchemy rows."""
        if self._arrow is None:
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            return pl.DataFrame(rows, schema=dict(schema), orient="row")
        # values bound, never inlined: the driver's own placeholders ($1, $2, ...)
        compiled = query.compile(dialect=ADBC_DIALECT, compile_kwargs={"render_postcompile": True})
        params = [compiled.params[name] for name in compiled.positiontup or ()]
        found = self._arrow.fetch(str(compiled), params)
        if found.width == 0:  # no rows: some drivers give no columns either
            return pl.DataFrame(schema=dict(schema))
        return found.rename(dict(zip(found.columns, schema, strict=True))).cast(dict(schema))

    def links_for(
        self,
        flow: str,
        columns: Mapping[str, pl.DataType],
        a_ids: Iterable[str] = (),
        b_ids: Iterable[str] = (),
    ) -> pl.DataFrame:
        """The links of a flow touching these ids (an incremental run's share of the state)."""
        asked = {"a_id": list(a_ids), "b_id": list(b_ids)}
        if self.engine.dialect.name == "sqlite":
            chunks = [
                chunk
                for column, ids in asked.items()
                if ids
                for chunk in _sqlite_links(self.engine, flow, bool(columns), (column, ids))
            ]
        else:
            query, schema = _link_query(flow, bool(columns))
            found = [
                self.frame(query.where(_one_of(links.c[column], chunk)), schema)
                for column, ids in asked.items()
                for chunk in _chunks(ids, LINK_CHUNK)
            ]
            chunks = [_split_bases(pl.concat(found))] if found else []
        links_found = _decode_links(chunks, columns)
        return links_found.unique("a_id", keep="first", maintain_order=True)

    def bases(
        self, flow: str, columns: Mapping[str, pl.DataType], a_ids: pl.Series
    ) -> pl.DataFrame:
        """``a_id, base.<column>`` of these links of a flow: a full plan reads the values of
        the pairs whose records no longer hash like their base, not of all."""
        found = self.links_for(flow, columns, a_ids.to_list())
        return found.select("a_id", *[f"base.{name}" for name in columns])

    def live_links(self, flow: str) -> pl.DataFrame:
        """``a_id, b_id`` of a flow's links that are not tombstoned (for references)."""
        query = sa.select(links.c.a_id, links.c.b_id).where(
            links.c.flow == flow, ~links.c.tombstoned
        )
        return self.frame(query, {"a_id": pl.String, "b_id": pl.String})

    def save_links(
        self,
        flow: str,
        rows: Iterable[tuple[str, str, Mapping[str, Any] | None]],
        run_id: str,
        *,
        columns: Mapping[str, pl.DataType],
    ) -> None:
        """Link ``(a_id, b_id)`` pairs with their base values (one transaction); ``columns``:
        the flow's canonical columns, as its plans read the bases back."""
        at = now()
        rows = list(rows)
        stored = _stored_bases([base for _a, _b, base in rows], columns)
        payload = [
            {
                "flow": flow,
                "a_id": a_id,
                "b_id": b_id,
                "tombstoned": False,
                "deleted_side": None,
                "base": text,
                "base_hash": digest,
                "updated_at": at,
            }
            for (a_id, b_id, _base), (text, digest) in zip(rows, stored, strict=True)
        ]
        with self.engine.begin() as conn:
            seq = self._link_write(conn)
            for row in payload:
                row["seq"] = seq
            self._upsert(conn, links, payload, ("flow", "a_id"))
        self._refresh_statistics(len(payload))

    def tombstone(self, flow: str, rows: Iterable[tuple[str, str, str]], run_id: str) -> int:
        """Tombstone links given as ``(a_id, b_id, deleted_side)``: ``a``, ``b`` or ``both``."""
        rows = list(rows)
        with self.engine.begin() as conn:
            seq = self._link_write(conn)
            for side in sorted({side for _a, _b, side in rows}):
                a_ids = [a for a, _b, s in rows if s == side]
                for start in range(0, len(a_ids), 5000):  # one statement per chunk, not per link
                    conn.execute(
                        links.update()
                        .where(links.c.flow == flow, links.c.a_id.in_(a_ids[start : start + 5000]))
                        .values(tombstoned=True, deleted_side=side, updated_at=now(), seq=seq)
                    )
            self._audit(
                conn,
                run_id,
                flow,
                [{"kind": "tombstone", "a_id": a, "b_id": b} for a, b, _side in rows],
            )
        return len(rows)

    # -- create intents ------------------------------------------------------------------
    def begin_creates(self, flow: str, side: str, source_ids: Sequence[str]) -> dict[str, str]:
        """An intent key per record to create, stored before any call (reused if pending)."""
        pending = self.pending_creates(flow)
        known = {
            row["source_id"]: row["key"]
            for row in pending.filter(pl.col("side") == side).iter_rows(named=True)
        }
        fresh = {sid: uuid.uuid4().hex for sid in source_ids if sid not in known}
        with self.engine.begin() as conn:
            if fresh:
                conn.execute(
                    intents.insert(),
                    [
                        {
                            "key": key,
                            "flow": flow,
                            "side": side,
                            "source_id": sid,
                            "status": "pending",
                            "created_at": now(),
                        }
                        for sid, key in fresh.items()
                    ],
                )
        return {sid: known.get(sid) or fresh[sid] for sid in source_ids}

    def pending_creates(self, flow: str) -> pl.DataFrame:
        """``side, source_id, key`` of creates not known to have landed."""
        query = sa.select(intents.c.side, intents.c.source_id, intents.c.key).where(
            intents.c.flow == flow, intents.c.status == "pending"
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return pl.DataFrame(
            rows, schema={"side": pl.String, "source_id": pl.String, "key": pl.String}, orient="row"
        )

    def finish_creates(
        self,
        flow: str,
        side: str,
        created: Sequence[tuple[str, str, str, Mapping[str, Any]]],
        run_id: str,
        *,
        columns: Mapping[str, pl.DataType],
    ) -> None:
        """Creates the CRM confirmed: ``(intent key, source id, new id, values)``; link them
        (``columns`` as for :meth:`save_links`)."""
        if not created:
            return
        at = now()
        link_rows = []
        stored = _stored_bases([values for *_ids, values in created], columns)
        for (_key, source_id, new_id, _values), (text, digest) in zip(created, stored, strict=True):
            a_id, b_id = (source_id, new_id) if side == "b" else (new_id, source_id)
            link_rows.append(
                {
                    "flow": flow,
                    "a_id": a_id,
                    "b_id": b_id,
                    "tombstoned": False,
                    "base": text,
                    "base_hash": digest,
                    "updated_at": at,
                }
            )
        with self.engine.begin() as conn:
            seq = self._link_write(conn)
            for row in link_rows:
                row["seq"] = seq
            self._upsert(conn, links, link_rows, ("flow", "a_id"))
            # one statement, the intents as its parameter sets (an UPDATE per intent cost
            # 0.4 ms: 18 s for an initial sync's 40k creates, the CRM idle meanwhile)
            conn.execute(
                intents.update()
                .where(intents.c.key == sa.bindparam("intent_key"))
                .values(status="done", result_id=sa.bindparam("new_id")),
                [{"intent_key": key, "new_id": new_id} for key, _sid, new_id, _v in created],
            )
            self._audit(
                conn,
                run_id,
                flow,
                [
                    {
                        "kind": "create",
                        "side": side,
                        "a_id": r["a_id"],
                        "b_id": r["b_id"],
                        "new_value": r["base"],
                    }
                    for r in link_rows
                ],
            )
        self._refresh_statistics(len(link_rows))

    def settle_intents(self, flow: str) -> int:
        """Pending intents whose source record is now linked have landed (found by lookup)."""
        with self.engine.begin() as conn:
            linked_a = sa.select(links.c.a_id).where(links.c.flow == flow)
            linked_b = sa.select(links.c.b_id).where(links.c.flow == flow)
            done = conn.execute(
                intents.update()
                .where(
                    intents.c.flow == flow,
                    intents.c.status == "pending",
                    sa.or_(
                        sa.and_(intents.c.side == "b", intents.c.source_id.in_(linked_a)),
                        sa.and_(intents.c.side == "a", intents.c.source_id.in_(linked_b)),
                    ),
                )
                .values(status="done")
            )
        return done.rowcount or 0

    # -- dead letters ------------------------------------------------------------------------
    def dead_letter(self, flow: str, failures: Iterable[tuple[str, str, str, str]]) -> None:
        """Per-record failures ``(side, record id, action, message)``: counted, kept for retry."""
        failures = list(failures)
        if not failures:
            return
        at = now()
        rows = {  # one row per key (the last message wins), as one bulk upsert
            (side, record_id, action): {
                "flow": flow,
                "side": side,
                "record_id": record_id,
                "action": action,
                "attempts": 1,
                "message": message[:4000],
                "first_at": at,
                "last_at": at,
            }
            for side, record_id, action, message in failures
        }
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        with self.engine.begin() as conn:
            values = list(rows.values())
            for start in range(0, len(values), 2000):  # 8 columns: within SQLite's 32k params
                stmt = dialect.insert(dead_letters).values(values[start : start + 2000])
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["flow", "side", "record_id", "action"],
                        set_={
                            "attempts": dead_letters.c.attempts + 1,
                            "message": stmt.excluded.message,
                            "last_at": stmt.excluded.last_at,
                        },
                    )
                )

    def replace_dead_letters(
        self, flow: str, side: str, action: str, failures: Sequence[tuple[str, str]]
    ) -> None:
        """The letters of one action are exactly these ``(record id, message)`` now.

        For failures that are a state of the data (a record that cannot be read) rather
        than of a call: a record fixed at its source stops being a dead letter.
        """
        keep = [record_id for record_id, _message in failures]
        with self.engine.begin() as conn:
            stale = dead_letters.delete().where(
                dead_letters.c.flow == flow,
                dead_letters.c.side == side,
                dead_letters.c.action == action,
            )
            if keep:
                stale = stale.where(dead_letters.c.record_id.not_in(keep))
            conn.execute(stale)
        self.dead_letter(
            flow, [(side, record_id, action, message) for record_id, message in failures]
        )

    def resolve_dead_letters(self, flow: str, side: str, record_ids: Iterable[str]) -> None:
        ids = list(record_ids)
        with self.engine.begin() as conn:
            for start in range(0, len(ids), 500):
                conn.execute(
                    dead_letters.delete().where(
                        dead_letters.c.flow == flow,
                        dead_letters.c.side == side,
                        dead_letters.c.record_id.in_(ids[start : start + 500]),
                    )
                )

    def dead_letters(self, flow: str | None = None) -> pl.DataFrame:
        """The open dead letters: flow, side, record id, action, attempts, message."""
        return self.dead_letter_records(flow).drop("first_at", "last_at")

    def dead_letter_records(self, flow: str | None = None) -> pl.DataFrame:
        """Like :meth:`dead_letters`, with when each failure was first and last seen (UTC)."""
        query = sa.select(dead_letters).order_by(
            dead_letters.c.flow, dead_letters.c.first_at, dead_letters.c.record_id
        )
        if flow is not None:
            query = query.where(dead_letters.c.flow == flow)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        for row in rows:
            row["first_at"], row["last_at"] = _utc(row["first_at"]), _utc(row["last_at"])
        schema = {
            "flow": pl.String,
            "side": pl.String,
            "record_id": pl.String,
            "action": pl.String,
            "attempts": pl.Int64,
            "message": pl.String,
            "first_at": pl.Datetime("us", "UTC"),
            "last_at": pl.Datetime("us", "UTC"),
        }
        return pl.DataFrame([{k: r[k] for k in schema} for r in rows], schema=schema)

    def reset_dead_letters(
        self,
        flow: str,
        keys: Iterable[tuple[str, str, str]],
        run_id: str,
        audit_rows: Iterable[Mapping[str, Any]] = (),
    ) -> int:
        """Dead letters ``(side, record id, action)`` start counting attempts afresh (the
        next plan retries every open one anyway); ``audit_rows`` say who asked, in the
        same transaction. Returns how many were found."""
        found = 0
        with self.engine.begin() as conn:
            for side, record_id, action in keys:
                done = conn.execute(
                    dead_letters.update()
                    .where(*_dead_letter_key(flow, side, record_id, action))
                    .values(attempts=0)
                )
                found += done.rowcount or 0
            self._audit(conn, run_id, flow, audit_rows)
        return found

    def delete_dead_letters(
        self,
        flow: str,
        keys: Iterable[tuple[str, str, str]],
        run_id: str,
        audit_rows: Iterable[Mapping[str, Any]] = (),
    ) -> int:
        """Remove dead letters ``(side, record id, action)``; ``audit_rows`` say who did, in
        the same transaction. Returns how many were removed."""
        removed = 0
        with self.engine.begin() as conn:
            for side, record_id, action in keys:
                done = conn.execute(
                    dead_letters.delete().where(*_dead_letter_key(flow, side, record_id, action))
                )
                removed += done.rowcount or 0
            self._audit(conn, run_id, flow, audit_rows)
        return removed

    # -- audit -------------------------------------------------------------------------------
    def record_audit(self, run_id: str, flow: str, rows: Iterable[Mapping[str, Any]]) -> None:
        with self.engine.begin() as conn:
            self._audit(conn, run_id, flow, rows)

    def _audit(
        self, conn: sa.Connection, run_id: str, flow: str, rows: Iterable[Mapping[str, Any]]
    ) -> None:
        at = now()
        payload = [{"at": at, "run_id": run_id, "flow": flow, **row} for row in rows]
        if payload:
            columns = {c.name for c in audit.columns}
            conn.execute(
                audit.insert(), [{c: row.get(c) for c in columns if c != "seq"} for row in payload]
            )

    def audited(self, flow: str, kind: str, a_ids: Sequence[str]) -> set[tuple[str, str]]:
        """``(a_id, field)`` pairs of the given records that already have an audit row of a kind."""
        query = sa.select(audit.c.a_id, audit.c.field).where(
            (audit.c.flow == flow) & (audit.c.kind == kind)
        )
        return {(a, f) for a, f in self._rows_in(query, audit.c.a_id, a_ids)}

    def audit_log(self, flow: str | None = None) -> pl.DataFrame:
        query = sa.select(audit).order_by(audit.c.seq)
        if flow is not None:
            query = query.where(audit.c.flow == flow)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        names = [c.name for c in audit.columns if c.name not in ("at", "seq")]
        return pl.DataFrame(
            [{k: r[k] for k in names} for r in rows], schema=dict.fromkeys(names, pl.String)
        )

    def audit_entries(
        self,
        flow: str | None = None,
        kinds: Sequence[str] = (),
        since: datetime | None = None,
        record_id: str | None = None,
        limit: int | None = None,
    ) -> pl.DataFrame:
        """Audit rows with their time (UTC) and sequence number, oldest first: of one flow,
        of some kinds, at or after ``since``, naming a record (on either side), the last
        ``limit`` of them."""
        query = sa.select(audit).order_by(audit.c.seq.desc())
        if flow is not None:
            query = query.where(audit.c.flow == flow)
        if kinds:
            query = query.where(audit.c.kind.in_(list(kinds)))
        if since is not None:
            since = since if since.tzinfo else since.replace(tzinfo=UTC)
            query = query.where(audit.c.at >= since.astimezone(UTC))
        if record_id is not None:
            query = query.where((audit.c.a_id == record_id) | (audit.c.b_id == record_id))
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        rows.reverse()
        for row in rows:
            row["at"] = _utc(row["at"])
        schema: dict[str, Any] = {c.name: pl.String for c in audit.columns}
        schema.update(seq=pl.Int64, at=pl.Datetime("us", "UTC"))
        return pl.DataFrame([{k: r[k] for k in schema} for r in rows], schema=schema)

    # -- the sync's own writes -----------------------------------------------------------------
    def record_own_writes(self, system: str, obj: str, stamped: Iterable[tuple[str, str]]) -> None:
        """The records the sync just wrote, with the modification time each write got."""
        t = time.time()
        rows = [
            {"system": system, "obj": obj, "record_id": i, "stamp": stamp_key(s), "at": t}
            for i, s in stamped
        ]
        with self.engine.begin() as conn:
            self._upsert(conn, own_writes, rows, ("system", "obj", "record_id"))
            conn.execute(own_writes.delete().where(own_writes.c.at < t - OWN_WRITES_SECONDS))

    def own_writes(self, system: str, obj: str, stamped: Sequence[tuple[str, str]]) -> set[str]:
        """Of ``(record id, modification time)`` pairs, the ids whose version the sync wrote
        itself (a change the sensors must not start another run for)."""
        wanted = {i: stamp_key(s) for i, s in stamped}
        query = sa.select(own_writes.c.record_id, own_writes.c.stamp).where(
            (own_writes.c.system == system) & (own_writes.c.obj == obj)
        )
        return {
            i
            for i, s in self._rows_in(query, own_writes.c.record_id, list(wanted))
            if wanted.get(i) == s
        }

    # -- clocks ---------------------------------------------------------------------------------
    def record_clock(self, system: str, offset_seconds: float, keep: int = CLOCK_SAMPLES) -> None:
        """One reading of a CRM's clock offset (from its ``Date`` headers); the last
        ``keep`` readings per CRM are kept."""
        with self.engine.begin() as conn:
            conn.execute(
                clock_samples.insert().values(system=system, offset_seconds=offset_seconds)
            )
            old = (
                sa.select(clock_samples.c.seq)
                .where(clock_samples.c.system == system)
                .order_by(clock_samples.c.seq.desc())
                .offset(keep)
            )
            conn.execute(clock_samples.delete().where(clock_samples.c.seq.in_(old)))

    def clock_offset(self, system: str) -> float:
        """A CRM's clock offset against the sync host (seconds): the median of its last
        readings, robust to one slow answer; 0 before any reading."""
        with self.engine.connect() as conn:
            query = sa.select(clock_samples.c.offset_seconds).where(
                clock_samples.c.system == system
            )
            values = sorted(conn.execute(query).scalars())
        return significant(statistics.median(values)) if values else 0.0

    def link_count(self, flow: str) -> int:
        """How many links the flow has, tombstoned ones included (the breaker's whole)."""
        query = sa.select(sa.func.count()).select_from(links).where(links.c.flow == flow)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def tombstoned(self, flow: str) -> pl.DataFrame:
        """``a_id, deleted_side`` of the flow's tombstoned links (records deleted on a side;
        ``deleted_side`` null where it is not known)."""
        query = sa.select(links.c.a_id, links.c.deleted_side).where(
            links.c.flow == flow, links.c.tombstoned
        )
        return self.frame(query, {"a_id": pl.String, "deleted_side": pl.String})

    def links_changed_since(self, flow: str, at: datetime) -> pl.Series:
        """``a_id`` of the flow's links made, rebased or tombstoned since ``at``."""
        query = sa.select(links.c.a_id).where(links.c.flow == flow, links.c.updated_at >= at)
        return self.frame(query, {"a_id": pl.String}).get_column("a_id")

    # -- cursors -------------------------------------------------------------------------------
    def cursor(self, name: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(cursors.c.value).where(cursors.c.name == name)).scalar()

    def set_cursor(self, name: str, value: str) -> None:
        with self.engine.begin() as conn:
            self._upsert(conn, cursors, [{"name": name, "value": value}], ("name",))


#: Dead letters of these actions name the record written to; the others (create, read)
#: name their source record as ``<side>:<id>``.
UPDATE_ACTIONS = ("update", "delete")


def dead_letter_record(side: str, record_id: str, action: str) -> tuple[str, str]:
    """``(side, id)`` of the record a dead letter is about: the written record for an
    update, the source record (``a:<id>``) for a create or a read."""
    head, sep, rest = record_id.partition(":")
    if action not in UPDATE_ACTIONS and sep and head in ("a", "b"):
        return head, rest
    return side, record_id


def _plan_mark_cursor(flow: str) -> str:
    return f"plan_mark/{flow}"


def _utc(value: datetime) -> datetime:
    """A stored time as UTC (SQLite hands back the UTC wall time without its zone)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _dead_letter_key(flow: str, side: str, record_id: str, action: str) -> list[Any]:
    return [
        dead_letters.c.flow == flow,
        dead_letters.c.side == side,
        dead_letters.c.record_id == record_id,
        dead_letters.c.action == action,
    ]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
