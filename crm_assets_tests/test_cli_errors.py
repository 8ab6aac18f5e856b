"""Failures a user causes say why in one line, with the setting or command that fixes them.

Wrong credentials, a missing or malformed document, an unreachable CRM, a
circuit-breaker trip: each a non-zero exit code of its own, at most three lines
on stderr and never a traceback (``--verbose`` would show it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SyncWorld
from embedded_fixtures import free_port

from crm_assets.headless import EXIT, execute_sync
from crm_assets.settings import packaged_spec_path


def cli_sync(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crm_assets.cli", "sync", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    print(f"\nexit {result.returncode}: {result.stderr.strip()}")
    assert 1 <= len(lines) <= 3 and "Traceback" not in result.stderr
    return lines[0]


def test_a_wrong_secret_is_one_line_naming_the_setting(sync_world: SyncWorld):
    result = cli_sync(CRM_OFFICE_CLIENT_SECRET="not-the-secret")
    assert result.returncode == EXIT["credentials"]
    line = one_line(result)
    assert line.startswith("error: CRMOffice") and "CRM_OFFICE_CLIENT_SECRET" in line
    assert "not-the-secret" not in result.stderr + result.stdout


def test_an_unreachable_crm_is_one_line_naming_the_setting(sync_world: SyncWorld):
    result = cli_sync(CUSTOM_CRM_BASE_URL=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == EXIT["unreachable"]
    line = one_line(result)
    assert line.startswith("error: Custom CRM") and "CUSTOM_CRM_BASE_URL" in line


@pytest.mark.parametrize("problem", ["missing", "malformed"])
def test_a_bad_document_is_one_line_naming_the_file(tmp_path: Path, problem: str):
    document = tmp_path / "flows.rst"
    if problem == "malformed":
        document.write_text(
            "A to B Dataflow\n===============\n\nA X to B Y\n----------\n\n"
            ".. list-table::\n   :header-rows: 1\n\n   * - A X Property\n     - B Y Property\n"
            "     - B Data Type\n   * - one\n     - two\n"
        )
    result = cli_sync(CRM_SYNC_SPEC=str(document), CRM_SYNC_DATA_DIR=str(tmp_path / "data"))
    assert result.returncode == EXIT["document"]
    line = one_line(result)
    assert "flows.rst" in line and "CRM_SYNC_SPEC" in line
    if problem == "malformed":
        assert "line" in line


@pytest.mark.parametrize("problem", ["missing", "empty folder", "same pair twice"])
def test_a_bad_list_of_documents_is_one_line_naming_the_file(tmp_path: Path, problem: str):
    specs = packaged_spec_path().parent
    listed = {
        "missing": [packaged_spec_path(), tmp_path / "gone.rst"],
        "empty folder": [specs / "hubspot-crmoffice.rst", tmp_path],
        "same pair twice": [packaged_spec_path(), specs / "crmoffice-customcrm.rst"],
    }[problem]
    setting = ",".join(str(p) for p in listed)
    result = cli_sync(CRM_SYNC_SPEC=setting, CRM_SYNC_DATA_DIR=str(tmp_path / "data"))
    assert result.returncode == EXIT["document"]
    line = one_line(result)
    assert str(listed[-1]) in line and "CRM_SYNC_SPEC" in line
    if problem == "same pair twice":
        assert str(listed[0]) in line and "select one of them" in line


def test_a_breaker_trip_fails_the_run_with_its_reason_and_force_writes(sync_world: SyncWorld):
    with sync_world.custom_client() as a:
        ids = [a.create("contacts", {"Email": f"p{i}@example.com"})["Id"] for i in range(60)]
    assert execute_sync().success
    with sync_world.custom_client() as a:
        for record_id in ids[:40]:
            a.update("contacts", record_id, {"Title": "Mass edit"})
    tripped = cli_sync()
    assert tripped.returncode == EXIT["breaker"]
    line = one_line(tripped)
    assert "circuit breaker: 40 of 60 linked records in CRMOffice would change" in line
    assert "force: true" in line and "crm-assets sync --force" in line
    with sync_world.office_client() as b:
        titles = [r["title"] for page in b.pages("contacts") for r in page]
    assert "Mass edit" not in titles  # nothing written
    forced = cli_sync("--force")
    assert forced.returncode == 0, forced.stderr
    with sync_world.office_client() as b:
        titles = [r["title"] for page in b.pages("contacts") for r in page]
    assert titles.count("Mass edit") == 40


def test_a_dry_run_writes_nothing_anywhere_and_shows_what_it_would_write(
    sync_world: SyncWorld,
):
    with sync_world.custom_client() as a:
        a.create("contacts", {"Email": "dry@example.com", "Title": "CTO"})
    result = cli_sync("--dry-run")
    print(result.stdout)
    assert result.returncode == 0, result.stderr
    assert "create in CRMOffice from Custom CRM C-" in result.stdout
    assert "email='dry@example.com'" in result.stdout and "title='CTO'" in result.stdout
    assert not (sync_world.data_dir / "reports" / "qa-report.md").exists()
    assert sync_world.state().audit_log().height == 0
    with sync_world.office_client() as b:
        assert [r for page in b.pages("contacts") for r in page] == []


def test_a_second_demo_refuses_before_starting_anything(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "crm_assets.cli", "demo", "--port", str(free_port())],
            capture_output=True,
            text=True,
            env={
                **os.environ,
                "CUSTOM_CRM_BASE_URL": f"http://127.0.0.1:{port}",
                "CRM_SYNC_DATA_DIR": str(tmp_path),
            },
            timeout=60,
        )
    assert result.returncode == 2
    line = one_line(result)
    assert f"Custom CRM (CUSTOM_CRM_BASE_URL) on port {port}" in line
    assert not (tmp_path / "services").exists()  # nothing started


@pytest.mark.parametrize("command", ["sync", "audit"])
def test_a_state_database_that_cannot_be_opened_is_one_line_naming_the_setting(
    sync_world: SyncWorld, command: str
):
    """A wrong host, database or password in CRM_SYNC_STATE_URL: one line naming the
    setting, the URL without its password, and nothing written to either CRM."""
    url = f"postgresql+psycopg://sync:not-the-password@127.0.0.1:{free_port()}/crm_state"
    with sync_world.custom_client() as a:
        a.create("contacts", {"Email": "waiting@example.com"})
    result = subprocess.run(
        [sys.executable, "-m", "crm_assets.cli", command],
        capture_output=True,
        text=True,
        env={**os.environ, "CRM_SYNC_STATE_URL": url},
        timeout=300,
    )
    assert result.returncode == EXIT["state"]
    line = one_line(result)
    assert line.startswith("error: cannot open the state database postgresql+psycopg://sync:***@")
    assert "CRM_SYNC_STATE_URL" in line
    assert "not-the-password" not in result.stderr + result.stdout
    with sync_world.office_client() as b:
        assert [r for page in b.pages("contacts") for r in page] == []  # nothing written
