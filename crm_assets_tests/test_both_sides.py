"""A flow writes both of its CRMs at the same time, and an interrupted write stops both.

Real embedded CRMs under rate limits, seeded so that most records must be created on
the other side; over both document directions.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import DOCUMENTS
from embedded_fixtures import EmbeddedService

from crm_assets.crm_office.client import CrmOfficeClient
from crm_assets.custom_crm.client import CustomCrmClient
from crm_assets.engine.document import read_document
from crm_assets.engine.mapping import FlowMapping
from crm_assets.engine.snapshot import SnapshotStore
from crm_assets.engine.state import SyncState
from crm_assets.sync import (
    flow_mappings,
    map_flow,
    plan_flow,
    reference_links,
    sync_once,
    take_snapshot,
    write_flow,
)

pytestmark = pytest.mark.slow

#: Custom CRM's seed; CRMOffice holds far fewer, so most contacts are created in CRMOffice.
CUSTOM_SEED, OFFICE_SEED = 2400, 100
#: calls a second: CRMOffice's batches and Custom CRM's single calls each take seconds
CUSTOM_RATE, OFFICE_RATE = 40.0, 4.0
#: which field each CRM stamps a record's last change in
MODIFIED = {"custom_crm": "Modified", "crm_office": "updatedAt"}
EMAIL = {"custom_crm": "Email", "crm_office": "email"}
CRM_ASSETS = str(Path(sys.executable).parent / "crm-assets")


class Interrupted(Exception):
    """What the test's SIGINT handler raises (Dagster raises its own when a run is terminated)."""


@pytest.fixture
def services(
    embedded_service_factory: Callable[..., EmbeddedService],
) -> tuple[EmbeddedService, EmbeddedService]:
    """Custom CRM and CRMOffice, seeded and rate limited."""
    return (
        embedded_service_factory("custom-crm", seed=CUSTOM_SEED, rate_limit=CUSTOM_RATE),
        embedded_service_factory("crm-office", seed=OFFICE_SEED, rate_limit=OFFICE_RATE),
    )


@pytest.fixture
def crms(services: tuple[EmbeddedService, EmbeddedService]) -> Iterator[dict[str, Any]]:
    """Clients (by connector key) to both CRMs."""
    custom, office = services
    with (
        CustomCrmClient(
            custom.base_url, custom.credentials["api_key"], rate_limit=CUSTOM_RATE
        ) as custom_client,
        CrmOfficeClient(
            office.base_url, **office.credentials, rate_limit=OFFICE_RATE
        ) as office_client,
    ):
        yield {"custom_crm": custom_client, "crm_office": office_client}


def contacts_flow(document: str) -> tuple[list[FlowMapping], FlowMapping]:
    mappings = flow_mappings(read_document(DOCUMENTS[document]))
    (contacts,) = [m for m in mappings if "contacts" in (m.a.obj, m.b.obj)]
    return mappings, contacts


def contacts(client: Any) -> list[dict[str, Any]]:
    return [r for page in client.pages("contacts") for r in page if not r.get("Deleted")]


def stamped_since(records: list[dict[str, Any]], field: str, since: datetime) -> list[datetime]:
    stamps = (datetime.fromisoformat(str(r[field]).replace("Z", "+00:00")) for r in records)
    return sorted(s for s in stamps if s >= since)


@pytest.mark.parametrize("document", sorted(DOCUMENTS))
def test_the_two_crms_of_a_flow_are_written_at_the_same_time(
    crms: dict[str, Any], tmp_path: Path, document: str
) -> None:
    """The contacts' writes to each CRM overlap in time: an initial sync takes about as
    long as its slower CRM, not the sum of both (each CRM has a rate limit of its own)."""
    mappings, _contacts = contacts_flow(document)
    started = datetime.now(UTC)
    runs = sync_once(
        mappings,
        crms,
        SnapshotStore(tmp_path / "snapshots"),
        SyncState(f"sqlite:///{tmp_path}/s.db"),
    )
    for run in runs.values():
        for result in run.results.values():
            assert result.skipped is None, result
    windows = {}
    for key, client in crms.items():
        written = stamped_since(contacts(client), MODIFIED[key], started)
        assert len(written) > 20, (key, len(written))
        windows[key] = (written[0], written[-1])
    (custom_from, custom_to), (office_from, office_to) = windows.values()
    assert max(custom_from, office_from) < min(custom_to, office_to), windows


@pytest.mark.parametrize("document", sorted(DOCUMENTS))
def test_an_interrupted_write_stops_both_crms_and_the_next_sync_finishes_without_duplicates(
    crms: dict[str, Any], tmp_path: Path, document: str
) -> None:
    """Terminating a run mid-write (SIGINT, as Dagster's terminate does) stops both
    writing threads at their next step; the next sync creates the rest, nothing twice."""
    mappings, flow = contacts_flow(document)
    store, state = SnapshotStore(tmp_path / "snapshots"), SyncState(f"sqlite:///{tmp_path}/s.db")
    sync_once([m for m in mappings if m is not flow], crms, store, state)  # products first
    for obj in (flow.a, flow.b):
        take_snapshot(crms[obj.system_key], obj, store)
    refs = reference_links(state, flow)
    plan = plan_flow(flow, *map_flow(flow, store, refs), state)
    office_side = "a" if flow.a.system_key == "crm_office" else "b"
    office_before = len(contacts(crms["crm_office"]))
    planned = plan.creates[office_side].height
    assert planned > 2000  # more than two steps of writes: the stop has a step to skip

    def interrupt(_signum: int, _frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGINT, interrupt)
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(1.0, signal.pthread_kill, (main, signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(Interrupted):
            write_flow(flow, plan, state, store, crms, "interrupted", refs)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    stopped_at = len(contacts(crms["crm_office"]))
    assert office_before < stopped_at < office_before + planned  # stopped after a step
    # each step's creates were linked as soon as CRMOffice answered: only those never
    # sent are still pending (none waits for the next plan to find it by its values)
    unsent = office_before + planned - stopped_at
    assert state.pending_creates(flow.name).filter(side=office_side).height == unsent
    assert state.live_links(flow.name).height >= plan.pairs.height + stopped_at - office_before

    runs = sync_once(mappings, crms, store, state)
    refused = [f for f in runs[flow.name].results[office_side].failures if f[1] == "create"]
    # every planned contact is in CRMOffice once: none lost, none created twice
    assert len(contacts(crms["crm_office"])) == office_before + planned - len(refused)


@pytest.mark.parametrize("document", sorted(DOCUMENTS))
def test_ctrl_c_during_crm_assets_sync_then_sync_again_finishes_at_once(
    services: tuple[EmbeddedService, EmbeddedService],
    crms: dict[str, Any],
    tmp_path: Path,
    document: str,
) -> None:
    """An operator stops `crm-assets sync` mid-write with Ctrl-C and runs it again: the
    first says in one line that it was interrupted, the second does not wait for the
    dead run's lease, and no contact is in CRMOffice twice."""
    custom, office = services
    _mappings, flow = contacts_flow(document)
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"} | {
        "CUSTOM_CRM_BASE_URL": custom.base_url,
        "CUSTOM_CRM_API_KEY": custom.credentials["api_key"],
        "CUSTOM_CRM_RATE_LIMIT": str(CUSTOM_RATE),
        "CRM_OFFICE_BASE_URL": office.base_url,
        "CRM_OFFICE_CLIENT_ID": office.credentials["client_id"],
        "CRM_OFFICE_CLIENT_SECRET": office.credentials["client_secret"],
        "CRM_OFFICE_RATE_LIMIT": str(OFFICE_RATE),
        "CRM_SYNC_DATA_DIR": str(data),
        "CRM_SYNC_SPEC": str(DOCUMENTS[document]),
        "CRM_SYNC_LEASE_WAIT": "5",
    }
    emails = [str(r[EMAIL["crm_office"]]).strip().lower() for r in contacts(crms["crm_office"])]
    seeded_twice = len(emails) - len(set(emails))
    first = subprocess.Popen(
        [CRM_ASSETS, "sync"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while _intents(data / "state.db", flow.name) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the contacts' creates are about to be sent
        assert first.poll() is None, "the sync finished before its writes could be stopped"
        first.send_signal(signal.SIGINT)
        said, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0
    assert "interrupted: the writes the CRMs confirmed are kept" in said, said[-2000:]
    assert "Traceback" not in said

    begun = time.monotonic()
    second = subprocess.run(
        [CRM_ASSETS, "sync"], env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "is being synced by" not in second.stdout + second.stderr
    emails = [str(r[EMAIL["crm_office"]]).strip().lower() for r in contacts(crms["crm_office"])]
    assert len(emails) > OFFICE_SEED + CUSTOM_SEED * 0.9, time.monotonic() - begun
    assert len(emails) - len(set(emails)) == seeded_twice  # nothing created twice


def _intents(db: Path, flow: str) -> int:
    """Create intents of a flow stored so far (0 while the state is not there)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute("select count(*) from intents where flow = ?", (flow,)).fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0])
