"""Loading a flow's links with their base values (``SyncState.links``, ``links_for``).

Every run starts by loading these, so the reader is a fast path (texts that SQLite
aggregates, Arrow from PostgreSQL) and must still return exactly what was saved:
any ids and values (quotes, newlines, control characters, Unicode), links without a
base, tombstones, several chunks, several flows in one database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_assets.engine import state as state_module
from crm_assets.engine.state import SyncState

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
@given(saved=links, other=links, chunk=st.integers(1, 4))
def test_links_load_exactly_as_saved(
    states: list[SyncState],
    monkeypatch: pytest.MonkeyPatch,
    saved: list[tuple[str, str, dict[str, Any] | None, bool]],
    other: list[tuple[str, str, dict[str, Any] | None, bool]],
    chunk: int,
) -> None:
    monkeypatch.setattr(state_module, "SQLITE_LINK_CHUNK", chunk)
    flow, neighbour = f"flow-{uuid.uuid4().hex}", f"other-{uuid.uuid4().hex}"
    for state in states:
        for name, rows in ((flow, saved), (neighbour, other)):  # interleaved in the table
            state.save_links(name, [(a, b, base) for a, b, base, _dead in rows], "test")
            state.tombstone(name, [(a, b) for a, b, _base, dead in rows if dead], "test")
        want = expected(saved)
        got = state.links(flow, COLUMNS).sort("a_id")
        assert got.equals(want), (state.engine.dialect.name, got, want)
        keys = state.links(flow, {}).sort("a_id")
        assert keys.equals(want.select("a_id", "b_id", "tombstoned", "has_base"))
        some = [a for a, *_ in saved[::2]]
        part = state.links_for(flow, COLUMNS, a_ids=some).sort("a_id")
        assert part.equals(want.filter(pl.col("a_id").is_in(some)))
