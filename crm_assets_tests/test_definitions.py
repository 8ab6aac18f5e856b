"""The Dagster definitions load, and their shape follows the dataflow document."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from crm_assets.connectors import UnsupportedFlow
from crm_assets.definitions import build_definitions
from crm_assets.settings import Settings, packaged_spec_path

ROOT = Path(__file__).resolve().parents[1]
SPECS = Path(__file__).parent / "fixtures" / "specs"
#: The project's documents: Custom CRM ↔ CRMOffice and HubSpot ↔ CRMOffice share CRMOffice.
PROJECT = ("customcrm-crmoffice.rst", "hubspot-crmoffice.rst")


def project_folder(tmp_path: Path) -> Path:
    """A folder holding the two project documents."""
    folder = tmp_path / "specs"
    folder.mkdir()
    for name in PROJECT:
        (folder / name).write_bytes((packaged_spec_path().parent / name).read_bytes())
    return folder


@pytest.mark.parametrize("documents", ["packaged", "folder of two"])
def test_dg_check_defs_passes(tmp_path, documents):
    env = {**os.environ, "VIRTUAL_ENV": str(Path(sys.executable).parents[1])}
    if documents == "folder of two":
        env |= {"CRM_SYNC_SPEC": str(project_folder(tmp_path)), "CRM_SYNC_DATA_DIR": str(tmp_path)}
    dg_cli = Path(sys.executable).parent / "dg"
    result = subprocess.run(
        [str(dg_cli), "check", "defs"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All definitions loaded successfully" in result.stdout + result.stderr


def settings_for(spec: Path, tmp_path: Path, skip_unsupported: bool = False) -> Settings:
    return dataclasses.replace(
        Settings.from_env(),
        spec_paths=(spec,),
        data_dir=tmp_path,
        skip_unsupported=skip_unsupported,
    )


def groups(defs: dg.Definitions) -> dict[str, list[str]]:
    graph = defs.resolve_asset_graph()
    out: dict[str, list[str]] = {}
    for key in graph.get_all_asset_keys():
        out.setdefault(graph.get(key).group_name, []).append(key.to_user_string())
    return out


def test_packaged_document_gives_one_group_per_flow(tmp_path):
    defs = build_definitions(settings_for(packaged_spec_path(), tmp_path))
    found = groups(defs)
    assert {"contact_to_contacts", "product_to_companies"} <= set(found)
    spec = defs.resolve_asset_graph().get(dg.AssetKey(["contact_to_contacts", "dataflow"]))
    assert spec.metadata["flow"] == "Custom CRM Contact to CRMOffice Contacts"
    assert spec.metadata["merge_on"] == "Email = email"
    table = spec.metadata["properties"].value
    assert [r.data["target"] for r in table.records][-1] == "company.id"


def test_crm_sync_spec_selects_another_document(tmp_path, monkeypatch):
    monkeypatch.setenv("CRM_SYNC_SPEC", str(SPECS / "crmoffice-customcrm.rst"))
    defs = build_definitions(dataclasses.replace(Settings.from_env(), data_dir=tmp_path))
    found = groups(defs)
    assert "companies_to_product" in found and "contacts_to_contact" in found


def test_a_document_naming_a_system_without_connector_fails_at_load_naming_it(tmp_path):
    with pytest.raises(UnsupportedFlow) as err:
        build_definitions(settings_for(SPECS / "hubspot-superoffice.rst", tmp_path))
    message = str(err.value)
    assert "hubspot-superoffice.rst, line 12" in message and "'SuperOffice'" in message
    assert "available systems: Custom CRM, CRMOffice, HubSpot" in message and "\n" not in message


def test_skipping_unsupported_flows_keeps_their_definitions_but_syncs_nothing(tmp_path):
    defs = build_definitions(settings_for(SPECS / "hubspot-superoffice.rst", tmp_path, True))
    found = groups(defs)
    assert "contact_to_person" in found and "quote_to_quotealternative" in found
    assert len([g for g in found if "_to_" in g]) == 10
    assert all(k.endswith("/dataflow") for g, keys in found.items() if "_to_" in g for k in keys)


def test_materializing_a_flow_records_its_definition(tmp_path):
    defs = build_definitions(settings_for(SPECS / "freshteam-crmoffice.rst", tmp_path, True))
    key = dg.AssetKey(["employee_to_contacts", "dataflow"])
    result = dg.materialize([defs.resolve_assets_def(key)])
    assert result.success
    written = json.loads((tmp_path / "flows" / "employee_to_contacts.json").read_text())
    assert written["properties"][2]["condition"] == {
        "value": "wd:Q214995",
        "path": "phone_numbers.name",
    }


@pytest.mark.parametrize("listed", ["comma-separated", "folder"])
def test_several_documents_load_together_sharing_snapshots(tmp_path, monkeypatch, listed):
    """Each document's flows in groups of their own, qualified by the document; the CRMOffice
    objects both documents sync have one snapshot asset each, read for both."""
    documents = [packaged_spec_path().parent / name for name in PROJECT]
    folder = project_folder(tmp_path)
    setting = ",".join(map(str, documents)) if listed == "comma-separated" else str(folder)
    monkeypatch.setenv("CRM_SYNC_SPEC", setting)
    defs = build_definitions(dataclasses.replace(Settings.from_env(), data_dir=tmp_path))
    found = groups(defs)
    assert sorted(found["crm_office"]) == ["crm_office/companies", "crm_office/contacts"]
    flows = sorted(g for g in found if "_to_" in g)
    assert flows == [
        "customcrm_crmoffice__contact_to_contacts",
        "customcrm_crmoffice__product_to_companies",
        "hubspot_crmoffice__company_to_companies",
        "hubspot_crmoffice__contact_to_contacts",
    ]
    graph = defs.resolve_asset_graph()
    readers = graph.get(dg.AssetKey(["crm_office", "contacts"])).child_keys
    assert {k.path[0] for k in readers} >= {
        "customcrm_crmoffice__contact_to_contacts",
        "hubspot_crmoffice__contact_to_contacts",
    }
    jobs = {j.name for j in defs.resolve_all_job_defs()}
    assert {f"sync_{f}" for f in flows} | {"sync_all"} <= jobs
    assert sorted(s.name for s in defs.sensors) == [
        "crm_office_changes",
        "custom_crm_changes",
        "hubspot_changes",
        "reference_followups",
    ]


def test_the_install_compiled_dagster_and_the_project():
    """Commands and runs start from compiled modules: with ``PYTHONDONTWRITEBYTECODE`` set
    (as on CI's machines) an install without them compiles Dagster again in every process,
    3 to 5 s of each ``crm-assets`` command and of every subprocess the tests start."""
    import importlib.util

    import crm_assets.headless

    for module in (dg, crm_assets.headless):
        compiled = Path(importlib.util.cache_from_source(str(module.__file__)))
        assert compiled.exists(), f"{compiled} missing: `make clean install` compiles it"
