"""Three CRMs through two documents synced together: Custom CRM ↔ CRMOffice and HubSpot ↔
CRMOffice, a CRMOffice contact linked to a contact in each of the others.

The real embedded services over HTTP and the headless runner ``crm-assets sync`` uses,
with ``CRM_SYNC_SPEC`` naming both project documents: an edit in any CRM reaches the
other two, and nothing echoes back (a quiet round writes nothing).
"""

from __future__ import annotations

import pytest
from conftest import SyncWorld
from test_automation import jobs_of, office_resource, tick
from test_hubspot import HubSpotService, _hubspot_process  # noqa: F401

from crm_assets.headless import SyncOutcome, execute_sync
from crm_assets.settings import packaged_spec_path

SPECS = packaged_spec_path().parent
BOTH = f"{SPECS / 'customcrm-crmoffice.rst'},{SPECS / 'hubspot-crmoffice.rst'}"
EMAIL = "anne@three.example"


@pytest.fixture
def three(
    sync_world: SyncWorld,
    _hubspot_process: HubSpotService,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[SyncWorld, HubSpotService]:
    """The three CRMs empty, and the sync configured with both documents."""
    hubspot = _hubspot_process
    hubspot.reset()
    monkeypatch.setenv("HUBSPOT_BASE_URL", hubspot.base_url)
    monkeypatch.setenv("HUBSPOT_ACCESS_TOKEN", hubspot.token)
    monkeypatch.setenv("CRM_SYNC_SPEC", BOTH)
    return sync_world, hubspot


def sync() -> SyncOutcome:
    outcome = execute_sync()
    assert outcome.success, outcome.failures
    return outcome


def writes(outcome: SyncOutcome) -> int:
    """Records the run created or updated, in every CRM."""
    return sum(
        int(meta["created"]) + int(meta["updated"])
        for asset, meta in outcome.metadata.items()
        if "/writes_to_" in asset
    )


#: Each CRM's first-name field (as its client and the documents name it).
FIRST_NAME = {
    "custom_crm": "FirstName",
    "crm_office": "givenName",
    "hubspot": "properties.firstname",
}


def first_names(world: SyncWorld, hubspot: HubSpotService) -> dict[str, dict[str, str]]:
    """Per CRM, its contacts with the test's e-mail: id → first name."""
    with world.custom_client() as custom, world.office_client() as office, hubspot.client() as hs:
        found = {
            "custom_crm": {
                c["Id"]: c["FirstName"]
                for p in custom.pages("contacts")
                for c in p
                if c["Email"] == EMAIL
            },
            "crm_office": {
                c["id"]: c["givenName"]
                for p in office.pages("contacts")
                for c in p
                if c["email"] == EMAIL
            },
            "hubspot": {
                c["id"]: c["properties"]["firstname"]
                for p in hs.pages("contacts")
                for c in p
                if c["properties"]["email"] == EMAIL
            },
        }
    return found


def edit(world: SyncWorld, hubspot: HubSpotService, crm: str, record_id: str, value: str) -> None:
    """A user's edit of the first name in one CRM."""
    if crm == "custom_crm":
        with world.custom_client() as custom:
            custom.update("contacts", record_id, {FIRST_NAME[crm]: value})
    elif crm == "crm_office":
        with world.office_client() as office:
            person = office.get("contacts", record_id)
            office.replace("contacts", record_id, {**person, FIRST_NAME[crm]: value})
    else:
        with hubspot.client() as hs:
            hs.update("contacts", record_id, {FIRST_NAME[crm]: value})


def settle(world: SyncWorld, hubspot: HubSpotService, value: str) -> dict[str, str]:
    """Sync until the three CRMs agree on ``value``; then a quiet round must write nothing.
    Returns the contact's id in each CRM."""
    counts = []
    for _ in range(3):
        counts.append(writes(sync()))
        names = first_names(world, hubspot)
        if all(list(n.values()) == [value] for n in names.values()):
            break
    print(f"{value}: syncs wrote {counts}, then", end=" ")
    assert all(list(n.values()) == [value] for n in names.values()), names
    quiet = writes(sync())
    print(quiet)
    assert quiet == 0
    return {crm: next(iter(n)) for crm, n in names.items()}


def test_an_edit_in_each_crm_reaches_the_other_two_and_nothing_echoes(three):
    world, hubspot = three
    print()
    with world.custom_client() as custom:
        custom.create("contacts", {"Email": EMAIL, "FirstName": "Anne"})
    ids = settle(world, hubspot, "Anne")
    for crm, value in (("custom_crm", "Annie"), ("crm_office", "Ann"), ("hubspot", "Anna")):
        edit(world, hubspot, crm, ids[crm], value)
        assert settle(world, hubspot, value) == ids


def test_a_write_to_a_shared_object_starts_the_other_documents_flow(three):
    """The sync's own write to CRMOffice Contacts is news to the other document's flow: the
    sensor starts it (with one document the same write starts nothing)."""
    world, hubspot = three
    with hubspot.client() as hs:
        hs.create("contacts", {"properties.email": EMAIL, "properties.firstname": "Hal"})
    before, _ = tick("crm_office_changes", office_resource(world))
    assert execute_sync(flow="hubspot_crmoffice__contact_to_contacts").success
    after, _ = tick("crm_office_changes", office_resource(world), before.cursor)
    assert "sync_customcrm_crmoffice__contact_to_contacts" in jobs_of(after)
