"""The sync state on PostgreSQL (DESIGN section 5: "SQLite by default, PostgreSQL by URL").

Every sync scenario of ``test_sync.py`` runs again with ``CRM_SYNC_STATE_URL``
pointing at a fresh PostgreSQL database, and a slice of the property-based
convergence histories runs through the engine with its state there too.

The server comes from ``CRM_SYNC_TEST_POSTGRES_URL`` (``.ci/postgres.sh`` starts
a throwaway one and prints the URL; ``.ci/run`` sets it). Without it the tests
are skipped locally, and fail in CI (``CI=true``), where it must be set.
"""

from __future__ import annotations

import inspect
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
import test_sync
from conftest import SyncWorld
from hypothesis import HealthCheck, given, seed, settings
from test_convergence import (  # noqa: F401  (figure_writer: the fixture behind out)
    Stats,
    figure_writer,
    histories,
    memory_world,
    out,
    run_history,
)

URL_VARIABLE = "CRM_SYNC_TEST_POSTGRES_URL"

#: every scenario of test_sync.py that runs on a sync world, collected here again
SCENARIOS = {
    name: test
    for name, test in vars(test_sync).items()
    if name.startswith("test_") and "sync_world" in inspect.signature(test).parameters
}
globals().update(SCENARIOS)


def server_url() -> str:
    url = os.environ.get(URL_VARIABLE, "")
    if not url:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{URL_VARIABLE} is not set in CI: .ci/run starts PostgreSQL for it")
        pytest.skip(f"{URL_VARIABLE} not set (run .ci/postgres.sh and export its output)")
    return url


class Databases:
    """Fresh databases on the test server, dropped afterwards."""

    def __init__(self, url: str) -> None:
        self.url = sa.engine.make_url(url)
        self.admin = sa.create_engine(self.url, isolation_level="AUTOCOMMIT")
        self.made: list[str] = []

    def fresh(self) -> str:
        name = f"crm_test_{uuid.uuid4().hex[:16]}"
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        self.made.append(name)
        return self.url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self.admin.connect() as conn:
            for name in self.made:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.admin.dispose()


@pytest.fixture(scope="module")
def databases() -> Iterator[Databases]:
    dbs = Databases(server_url())
    with dbs.admin.connect() as conn:
        version = conn.execute(sa.text("show server_version")).scalar()
    out(f"\nPostgreSQL {version} at {dbs.url.host}:{dbs.url.port} for the sync state")
    yield dbs
    out(
        f"\nPostgreSQL: {len(SCENARIOS)} sync scenarios of test_sync.py and the convergence "
        f"histories ran on {len(dbs.made)} fresh databases"
    )
    dbs.drop_all()


@pytest.fixture
def sync_world(
    databases: Databases, sync_world: SyncWorld, monkeypatch: pytest.MonkeyPatch
) -> SyncWorld:
    """The same world as in test_sync.py, its state in a fresh PostgreSQL database."""
    url = databases.fresh()
    monkeypatch.setenv("CRM_SYNC_STATE_URL", url)
    sync_world.state_url = url
    assert sync_world.state().engine.dialect.name == "postgresql"
    return sync_world


def test_random_histories_converge_with_the_state_in_postgres(databases: Databases) -> None:
    stats = Stats()

    @seed(5432)
    @settings(
        max_examples=20,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(histories())
    def check(history: list[tuple[Any, ...]]) -> None:
        with memory_world(state_url=databases.fresh()) as world:
            assert world.state.engine.dialect.name == "postgresql"
            run_history(world, history, stats)

    check()
    out("\n" + stats.line("convergence through the engine, state in PostgreSQL"))
    assert stats.histories >= 20 and stats.duplicates == 0 and stats.losses == 0
