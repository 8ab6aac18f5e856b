"""The state database: loading a flow's links with their base values (``SyncState.links``,
``links_for``), and several syncs opening a new database at once.

Every run starts by loading these, so the reader is a fast path (texts that SQLite
aggregates, Arrow from PostgreSQL) and must still return exactly what was saved:
any ids and values (quotes, newlines, control characters, Unicode), links without a
base, tombstones, several chunks, several flows in one database.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_assets.engine import state as state_module
from crm_assets.engine.state import (
    ANALYZE_AFTER_LINKS,
    StateUnavailable,
    SyncState,
    values_digest,
)

COLUMNS: dict[str, pl.DataType] = {
    "email": pl.String(),
    "company.id": pl.String(),
    "count": pl.Int64(),
    "score": pl.Float64(),
    "active": pl.Boolean(),
}

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
#: ids as CRMs send them (PostgreSQL stores no NUL in text, whatever the reader)
ids = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00"),
    min_size=1,
    max_size=8,
)
bases = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "email": st.none() | text,
        "company.id": st.none() | text,
        "count": st.none() | st.integers(-(2**53), 2**53),
        "score": st.none() | st.floats(allow_nan=False, allow_infinity=False, width=32),
        "active": st.none() | st.booleans(),
    },
)
links = st.lists(
    st.tuples(ids, ids, bases, st.booleans()),
    max_size=25,
    unique_by=(
        lambda link: link[0],
        lambda link: link[1],
    ),
)


def database_urls(tmp: Path) -> list[str]:
    urls = [f"sqlite:///{tmp / 'state.db'}"]
    if os.environ.get("CRM_SYNC_TEST_POSTGRES_URL"):  # .ci/run starts one
        urls.append(os.environ["CRM_SYNC_TEST_POSTGRES_URL"])
    return urls


@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SyncState]]:
    found = [SyncState(url) for url in database_urls(tmp_path_factory.mktemp("links"))]
    yield found
    for state in found:
        state.dispose()


def expected(saved: list[tuple[str, str, dict[str, Any] | None, bool]]) -> pl.DataFrame:
    rows = [
        {
            "a_id": a,
            "b_id": b,
            "tombstoned": dead,
            "has_base": base is not None,
            **{f"base.{c}": (base or {}).get(c) for c in COLUMNS},
        }
        for a, b, base, dead in saved
    ]
    schema = {"a_id": pl.String, "b_id": pl.String, "tombstoned": pl.Boolean}
    schema |= {"has_base": pl.Boolean, **{f"base.{c}": d for c, d in COLUMNS.items()}}
    return pl.DataFrame(rows, schema=schema, orient="row").sort("a_id")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(saved=links, other=links, chunk=st.integers(1, 4), share=st.sampled_from([0.0, 1.0]))
def test_links_load_exactly_as_saved(
    states: list[SyncState],
    monkeypatch: pytest.MonkeyPatch,
    saved: list[tuple[str, str, dict[str, Any] | None, bool]],
    other: list[tuple[str, str, dict[str, Any] | None, bool]],
    chunk: int,
    share: float,
) -> None:
    # SQLite reads a flow through its index (share 1: any flow below the chunk) or in
    # passes over rowid ranges of the table (share 0)
    monkeypatch.setattr(state_module, "LINK_CHUNK", chunk)
    monkeypatch.setattr(state_module, "SQLITE_INDEXED_SHARE", share)
    flow, neighbour = f"flow-{uuid.uuid4().hex}", f"other-{uuid.uuid4().hex}"
    for state in states:
        for name, rows in ((flow, saved), (neighbour, other)):  # interleaved in the table
            links = [(a, b, base) for a, b, base, _dead in rows]
            state.save_links(name, links, "test", columns=COLUMNS)
            state.tombstone(name, [(a, b, "b") for a, b, _base, dead in rows if dead], "test")
        want = expected(saved)
        got = state.links(flow, COLUMNS).sort("a_id")
        assert got.drop("base_hash").equals(want), (state.engine.dialect.name, got, want)
        # each base's digest is the one a plan computes from the values it reads back
        values = got.select(pl.col(f"base.{c}").alias(c) for c in COLUMNS)
        digests = pl.when(got.get_column("has_base")).then(values_digest(values))
        assert got.select(pl.col("base_hash").eq_missing(digests).all()).item()
        keys = state.links(flow, {}).sort("a_id")
        assert keys.equals(got.select("a_id", "b_id", "tombstoned", "has_base", "base_hash"))
        some = [a for a, *_ in saved[::2]]
        part = state.links_for(flow, COLUMNS, a_ids=some).sort("a_id")
        assert part.equals(got.filter(pl.col("a_id").is_in(some)))
        asked = pl.Series("a_id", some, pl.String)
        base_values = state.bases(flow, COLUMNS, asked).sort("a_id")
        assert base_values.equals(part.select("a_id", *[f"base.{c}" for c in COLUMNS]))


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_syncs_started_together_on_a_new_state_database_all_open_it(
    tmp_path: Path, database: str
) -> None:
    """Two syncs started at the same moment on a state database nobody created yet (the
    first round of two operators, or a CLI sync beside a sensor's run): each creates the
    schema if missing, and neither may fail because the other just did."""
    if database == "postgresql":
        url = os.environ.get("CRM_SYNC_TEST_POSTGRES_URL")
        if not url:
            pytest.skip("CRM_SYNC_TEST_POSTGRES_URL is not set (.ci/run sets it)")
        url = fresh_postgres_database(url)
    else:
        url = f"sqlite:///{tmp_path / 'state.db'}"
    start = threading.Barrier(6)
    errors: list[BaseException] = []

    def open_state() -> None:
        start.wait()
        try:
            SyncState(url).dispose()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_state) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    state = SyncState(url)
    assert state.synced("any") is False  # the schema is whole
    state.dispose()


def test_a_state_database_a_newer_release_migrated_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    """Opening a state skips the schema checks its last migration made; a newer release's
    migration is still seen, and refused with what to do, before anything is read."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    SyncState(url).dispose()
    SyncState(url).dispose()  # opened again: the checks skipped
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # what a release of the next schema leaves
        conn.execute(sa.text("UPDATE schema_version SET version = version + 1"))
        conn.execute(sa.text("UPDATE counters SET value = value + 1 WHERE name = 'schema'"))
    engine.dispose()
    with pytest.raises(StateUnavailable) as refused:
        SyncState(url)
    message = str(refused.value)
    assert "newer than this release" in message and "CRM_SYNC_STATE_URL" in message
    assert "\n" not in message


def fresh_postgres_database(url: str) -> str:
    """A new, empty database on the test server (the schema race needs one nobody opened)."""
    name = f"race_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return sa.make_url(url).set(database=name).render_as_string(hide_password=False)


def test_a_postgres_state_reads_on_after_the_server_closed_its_connections() -> None:
    """The state keeps its Arrow connections open between queries; when the server has
    closed them since (a restart, an idle timeout, an administrator), the next read opens a
    new one instead of failing the run."""
    server = os.environ.get("CRM_SYNC_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("CRM_SYNC_TEST_POSTGRES_URL is not set (.ci/run sets it)")
    url = fresh_postgres_database(server)
    state = SyncState(url)
    state.save_links("flow", [("a1", "b1", {"email": "one@example.com"})], "test", columns=COLUMNS)
    assert state.links("flow", COLUMNS).get_column("a_id").to_list() == ["a1"]
    admin = sa.create_engine(url)
    with admin.connect() as conn:
        closed = conn.execute(
            sa.text(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t"
            )
        ).scalar()
    admin.dispose()
    assert closed >= 1  # the kept one among them
    found = state.links("flow", COLUMNS)
    assert found.get_column("base.email").to_list() == ["one@example.com"]
    state.dispose()


def test_a_bulk_save_leaves_postgres_with_statistics_to_plan_by() -> None:
    """PostgreSQL has no statistics of a new links table until autovacuum's next round (up
    to a minute): the next plans would not use the indexes. A bulk save (an initial sync)
    refreshes them; a small one leaves that to autovacuum."""
    server = os.environ.get("CRM_SYNC_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("CRM_SYNC_TEST_POSTGRES_URL is not set (.ci/run sets it)")
    url = fresh_postgres_database(server)
    state = SyncState(url)
    admin = sa.create_engine(url)

    def statistics() -> tuple[float, int]:
        with admin.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT c.reltuples, s.analyze_count FROM pg_class c JOIN pg_stat_user_tables"
                    " s ON s.relid = c.oid WHERE c.relname = 'links'"
                )
            ).one()

    assert statistics() == (-1, 0)  # never analyzed
    bulk = [(f"a{i}", f"b{i}", {"email": f"n{i}@example.com"}) for i in range(ANALYZE_AFTER_LINKS)]
    state.save_links("flow", bulk, "test", columns=COLUMNS)
    assert statistics() == (ANALYZE_AFTER_LINKS, 1)
    state.save_links("flow", [("c1", "d1", None)], "test", columns=COLUMNS)
    assert statistics() == (ANALYZE_AFTER_LINKS, 1)
    state.dispose()
    admin.dispose()
