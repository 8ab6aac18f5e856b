"""The sync with its data folder on S3 (``CRM_SYNC_DATA_URL=s3://bucket/prefix``), against
moto's S3 server on loopback: the same outcome as on disk, every file an object in the
bucket, and nothing on local disk but the state database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from conftest import SyncWorld
from moto.server import ThreadedMotoServer

from crm_assets.headless import EXIT, execute_sync, run_sync

BUCKET = "crm-sync-test"
PREFIX = "team/sync"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, stopped after the module's tests."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()  # the port the system chose
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A client to an empty bucket, with the sync's AWS settings pointing at it."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def keys(s3: Any) -> set[str]:
    """Every object in the bucket, relative to the data folder's prefix."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/")
    return {o["Key"].removeprefix(f"{PREFIX}/") for p in pages for o in p.get("Contents", [])}


def local_files(*folders: Path) -> list[str]:
    """Every file below the folders, by its path."""
    return sorted(str(p) for folder in folders for p in folder.rglob("*") if p.is_file())


def test_a_sync_with_its_data_on_s3_links_and_creates_on_both_crms_and_writes_only_objects(
    sync_world: SyncWorld, s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("CRM_SYNC_DATA_URL", f"s3://{BUCKET}/{PREFIX}")
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        a.create("products", {"Name": "Acme AS", "City": "Oslo"})
        b.create("companies", {"name": "Acme AS", "website": "https://acme.example"})
        b.create("companies", {"name": "Only In Office"})
        a.create("contacts", {"Email": "kari@example.com", "FirstName": "Kari"})
        b.create("contacts", {"email": "per@example.com", "givenName": "Per"})

    first = execute_sync()
    assert first.success, first.failures
    products, contacts = sync_world.products, sync_world.contacts
    assert first.of(f"{products}/reconciled")["links_new"] == 1
    assert first.of(f"{products}/writes_to_custom_crm")["created"] == 1
    assert first.of(f"{contacts}/writes_to_crm_office")["created"] == 1
    assert first.of(f"{contacts}/writes_to_custom_crm")["created"] == 1
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        assert sorted(r["Email"] for p in a.pages("contacts") for r in p) == [
            "kari@example.com",
            "per@example.com",
        ]
        assert sorted(r["Name"] for p in a.pages("products") for r in p) == [
            "Acme AS",
            "Only In Office",
        ]
        assert sorted(r["email"] for p in b.pages("contacts") for r in p) == [
            "kari@example.com",
            "per@example.com",
        ]

    stored = keys(s3)
    for system, obj in (
        ("custom_crm", "products"),
        ("custom_crm", "contacts"),
        ("crm_office", "companies"),
        ("crm_office", "contacts"),
    ):
        assert f"snapshots/{system}/{obj}.parquet" in stored
    for flow in (products, contacts):
        plan = f"flows/{flow}/runs/{first.run_id}/plan/plan.parquet"
        assert plan in stored, sorted(stored)
        assert f"flows/{flow}/synced" in stored
        assert f"flows/{flow}/checks.json" in stored
    assert "reports/qa-report.md" in stored
    # each flow's link copy (loaded by the next run, on whichever machine it runs)
    assert sum(k.startswith("state-links/") and k.endswith(".parquet") for k in stored) == 2
    # the state database (CRM_SYNC_STATE_URL, here in the data dir, with SQLite's WAL
    # files) is all there is on local disk
    state = str(sync_world.data_dir / "state.db")
    files = local_files(sync_world.data_dir, cwd)
    assert state in files and all(f in (state, f"{state}-shm", f"{state}-wal") for f in files)

    second = execute_sync()  # read back from the bucket: incremental, nothing to write
    assert second.success, second.failures
    for flow in (products, contacts):
        for system in ("crm_office", "custom_crm"):
            done = second.of(f"{flow}/writes_to_{system}")
            assert (done["created"], done["updated"]) == (0, 0)


def test_a_bucket_that_does_not_exist_fails_in_one_line_naming_the_setting(
    sync_world: SyncWorld, s3: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
):
    monkeypatch.setenv("CRM_SYNC_DATA_URL", "s3://no-such-bucket/sync")
    assert run_sync() == EXIT["storage"]
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert "s3://no-such-bucket/sync" in error and "NoSuchBucket" in error
    assert "CRM_SYNC_DATA_URL" in error
