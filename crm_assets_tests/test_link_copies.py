"""Link copies (``crm_assets.engine.link_copies``): a flow's links load from a Parquet copy
and the links written since it, and must load exactly as the database holds them
whatever happened in between: writes by another process (saves, relinks, tombstones,
confirmed creates), a database made again where the old one was, a backup put back, a
copy that cannot be read or a folder that cannot be written.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_assets.engine import state as state_module
from crm_assets.engine.link_copies import LinkCopies
from crm_assets.engine.state import SyncState
from crm_assets.engine.storage import Storage
from crm_assets_tests.test_state_links import database_urls

COLUMNS: dict[str, pl.DataType] = {"email": pl.String(), "count": pl.Int64()}

a_ids = st.sampled_from([f"a{i}" for i in range(6)])
base = st.none() | st.fixed_dictionaries(
    {"email": st.none() | st.text(max_size=6), "count": st.none() | st.integers(-9, 9)}
)
#: what happens to the flow, in any order, each followed by a load with or without bases
operations = st.lists(
    st.tuples(
        st.one_of(
            st.tuples(st.just("save"), st.lists(st.tuples(a_ids, base), max_size=4)),
            st.tuples(st.just("tombstone"), st.lists(a_ids, min_size=1, max_size=3)),
            st.tuples(st.just("create"), st.lists(a_ids, min_size=1, max_size=2)),
        ),
        st.booleans(),
    ),
    min_size=1,
    max_size=10,
)


@pytest.fixture(scope="module")
def databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[SyncState, ...]]]:
    """Per database: a process that writes (no copies), one that loads through copies, and
    the database itself read without any."""
    tmp = tmp_path_factory.mktemp("copies")
    found = []
    for url in database_urls(tmp):
        copies = tmp / f"copies-{len(found)}"
        found.append((SyncState(url), SyncState(url, Storage.at(copies)), SyncState(url)))
    yield found
    for states in found:
        for state in states:
            state.dispose()


def apply(writer: SyncState, flow: str, step: int, operation: tuple[str, Any]) -> None:
    kind, arg = operation
    linked = set(writer.links(flow, {}).get_column("a_id").to_list())
    if kind == "save":  # a new partner each time: a relink when the link exists
        rows = {a: (f"b:{a}:{step}", values) for a, values in arg}
        writer.save_links(flow, [(a, *row) for a, row in rows.items()], "t", columns=COLUMNS)
    elif kind == "tombstone":
        dead = [(a, f"unknown:{a}", "a") for a in set(arg) & linked]
        writer.tombstone(flow, dead, "t")
    elif kind == "create":  # records of side b created on side a, as an initial sync does
        sources = [f"src:{a}:{step}" for a in sorted(set(arg))]
        keys = writer.begin_creates(flow, "a", sources)
        created = [(keys[s], s, s.split(":")[1], {"email": s}) for s in sources]
        writer.finish_creates(flow, "a", created, "t", columns=COLUMNS)


def as_stored(state: SyncState, flow: str, columns: dict[str, pl.DataType]) -> pl.DataFrame:
    return state.links(flow, columns).sort("a_id")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(history=operations, refresh=st.sampled_from([0.0, 0.3, 1.0]))
def test_links_load_through_copies_exactly_as_the_database_holds_them(
    databases: list[tuple[SyncState, ...]],
    monkeypatch: pytest.MonkeyPatch,
    history: list[tuple[tuple[str, Any], bool]],
    refresh: float,
) -> None:
    # a copy written again after every change (0), after a few (0.3), or never again (1)
    monkeypatch.setattr(state_module, "REFRESH_SHARE", refresh)
    for writer, reader, database in databases:
        flow = f"flow-{uuid.uuid4().hex}"
        reader.links(flow, COLUMNS)  # the flow's first copy: empty
        for step, (operation, with_bases) in enumerate(history):
            apply(writer, flow, step, operation)
            columns = COLUMNS if with_bases else {}
            got = as_stored(reader, flow, columns)
            assert got.equals(as_stored(database, flow, columns)), (operation, got)
            # the load went through the flow's copy, which exists now
            assert LinkCopies(reader._copies.folder).read(flow, *reader.link_writes(), {})


def test_a_database_made_again_in_its_place_never_reads_the_old_ones_copies(
    tmp_path: Path,
) -> None:
    """The state lost and a new one made at the same path (the copies folder beside it
    left as it was), or an older backup of it put back: each loads what it holds."""
    path, copies = tmp_path / "state.db", tmp_path / "state-links"
    url, folder = f"sqlite:///{path}", Storage.at(copies)
    old = SyncState(url, folder)
    old.save_links("f", [("a1", "b1", {"email": "old"})], "t", columns=COLUMNS)
    old.links("f", COLUMNS)
    old.dispose()
    shutil.copy(path, tmp_path / "backup.db")
    # the backup's copy is newer than it: links saved (and loaded) after the backup
    later = SyncState(url, folder)
    later.save_links("f", [("a2", "b2", {"email": "later"})], "t", columns=COLUMNS)
    assert later.links("f", COLUMNS).height == 2
    later.dispose()
    shutil.copy(tmp_path / "backup.db", path)
    restored = SyncState(url, folder)
    assert restored.links("f", COLUMNS).get_column("a_id").to_list() == ["a1"]
    restored.dispose()

    path.unlink()
    new = SyncState(url, folder)
    assert any(copies.iterdir())  # the old database's copies are still there
    for n in (3, 4, 5):  # its counter past the old copy's: only the number tells them apart
        new.save_links("f", [(f"a{n}", f"b{n}", {"email": "new"})], "t", columns=COLUMNS)
    assert new.link_writes()[1] > 2
    assert new.links("f", COLUMNS).get_column("a_id").to_list() == ["a3", "a4", "a5"]
    new.dispose()


def test_a_copy_that_cannot_be_read_or_written_leaves_loads_to_the_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "state-links"
    state = SyncState(f"sqlite:///{tmp_path / 'state.db'}", Storage.at(folder))
    state.save_links("f", [("a1", "b1", {"email": "x", "count": 1})], "t", columns=COLUMNS)
    want = state.links("f", COLUMNS)
    (copy,) = folder.iterdir()
    copy.write_bytes(b"not parquet")
    with caplog.at_level(logging.WARNING):
        assert state.links("f", COLUMNS).equals(want)
    assert "not read" in caplog.text
    assert state.links("f", COLUMNS).equals(want)  # and the copy is whole again
    assert pl.read_parquet(copy).height == 1

    shutil.rmtree(folder)
    folder.write_text("a file where the folder was")
    state.save_links("f", [("a2", "b2", None)], "t", columns=COLUMNS)
    with caplog.at_level(logging.WARNING):
        assert state.links("f", COLUMNS).height == 2
    assert "not written" in caplog.text
    state.dispose()
