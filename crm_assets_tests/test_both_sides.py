"""A flow writes both of its CRMs at the same time, and an interrupted write stops both.

Real embedded CRMs under rate limits, seeded so that most records must be created on
the other side; over both document directions.
"""

from __future__ import annotations

import signal
import threading
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


class Interrupted(Exception):
    """What the test's SIGINT handler raises (Dagster raises its own when a run is terminated)."""


@pytest.fixture
def crms(
    embedded_service_factory: Callable[..., EmbeddedService],
) -> Iterator[dict[str, Any]]:
    """Clients (by connector key) to both CRMs, seeded and rate limited."""
    custom = embedded_service_factory("custom-crm", seed=CUSTOM_SEED, rate_limit=CUSTOM_RATE)
    office = embedded_service_factory("crm-office", seed=OFFICE_SEED, rate_limit=OFFICE_RATE)
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
