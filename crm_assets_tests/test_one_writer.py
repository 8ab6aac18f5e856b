"""One writer per flow: overlapping syncs never duplicate, a dead holder is taken over.

What operators actually do: two people run ``crm-assets sync`` at once, a CLI sync
overlaps a run the Dagster instance started, a sync process is killed mid-run.
Each test prints its figures (``pytest -s`` shows them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from conftest import SyncWorld

from crm_assets.engine.lease import FlowLease, LeaseHeld, lease_info
from crm_assets.engine.state import SyncState
from crm_assets.headless import execute_sync

REPETITIONS = 10
NEW_CONTACTS = 50


def all_records(client: Any, obj: str) -> list[dict[str, Any]]:
    return [r for page in client.pages(obj) for r in page]


def sync_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "crm_assets.cli", "sync", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def duplicates(world: SyncWorld) -> dict[str, int]:
    """E-mails held more than once, per CRM."""
    with world.custom_client() as a, world.office_client() as b:
        custom = Counter(
            r["Email"].strip().lower() for r in all_records(a, "contacts") if not r["Deleted"]
        )
        office = Counter(r["email"].strip().lower() for r in all_records(b, "contacts"))
    return {
        "custom_crm": sum(n - 1 for n in custom.values() if n > 1),
        "crm_office": sum(n - 1 for n in office.values() if n > 1),
    }


def new_contacts(world: SyncWorld, round_no: int) -> None:
    with world.custom_client() as a:
        for i in range(NEW_CONTACTS):
            a.create("contacts", {"Email": f"r{round_no}-{i}@example.com", "FirstName": f"N{i}"})


@pytest.mark.slow
@pytest.mark.timeout(900)  # 30 CLI syncs, each ~6 s of imports: 270 s alone on a 2-core machine
def test_two_concurrent_cli_syncs_never_duplicate(sync_world: SyncWorld):
    figures = []
    for round_no in range(REPETITIONS):
        new_contacts(sync_world, round_no)
        first, second = sync_process(), sync_process()
        codes = [finish(first), finish(second)]
        for code, _out, err in codes:
            # each exits 0 (it waited and synced what was left) or says who held the flow
            assert code == 0 or (code == 4 and "is being synced by run" in err), err
            assert "Traceback" not in err
        third = finish(sync_process())
        assert third[0] == 0, third[2]
        dup = duplicates(sync_world)
        figures.append((round_no, [c for c, _o, _e in codes], dup))
        assert dup == {"custom_crm": 0, "crm_office": 0}, figures
    with sync_world.office_client() as b:
        total = len(all_records(b, "contacts"))
    print(f"\n{REPETITIONS} rounds of {NEW_CONTACTS} new contacts, two syncs at once each:")
    for round_no, exit_codes, dup in figures:
        print(f"  round {round_no}: exit codes {exit_codes}, duplicates {dup}")
    print(f"  CRMOffice holds {total} contacts (expected {REPETITIONS * NEW_CONTACTS})")
    assert total == REPETITIONS * NEW_CONTACTS


@pytest.mark.slow
def test_a_cli_sync_overlapping_a_dagster_run_never_duplicates(
    sync_world: SyncWorld, tmp_path: Path
):
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {"DAGSTER_HOME": str(home)}
    # the instance exists before any run, as in a deployment (its webserver or daemon made
    # it): two processes creating one SQLite instance at the same moment race in Dagster's
    # own schema stamping ("Version table 'alembic_version' has more than one head present")
    dg.DagsterInstance.from_config(str(home)).dispose()
    for round_no in range(3):
        new_contacts(sync_world, round_no)
        dagster_run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dagster",
                "job",
                "execute",
                "-m",
                "crm_assets.definitions",
                "-j",
                "sync_all",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **env},
        )
        cli = sync_process(env=env)
        cli_code, _out, cli_err = finish(cli)
        dagster_out, _ = dagster_run.communicate(timeout=300)
        assert cli_code in (0, 4), cli_err
        third = finish(sync_process())
        assert third[0] == 0, third[2]
        dup = duplicates(sync_world)
        print(
            f"\nround {round_no}: dagster run exit {dagster_run.returncode}, "
            f"CLI exit {cli_code}, duplicates {dup}"
        )
        assert dup == {"custom_crm": 0, "crm_office": 0}, dagster_out[-3000:]


def test_a_second_writer_waits_then_stops_naming_the_holder(sync_world: SyncWorld):
    state = sync_world.state()
    holder = FlowLease(state, "contact_to_contacts", "3f2a1b2c9d8e", "run 3f2a1b2c9d8e (test)")
    holder.acquire()
    try:
        new_contacts(sync_world, 0)
        started = time.monotonic()
        code, _out, err = finish(sync_process(env={"CRM_SYNC_LEASE_WAIT": "2"}))
        waited = time.monotonic() - started
        print(f"\nsecond writer: exit {code} after {waited:.1f} s; stderr: {err.strip()}")
        assert code == 4
        assert err.strip().splitlines() == [err.strip()]  # one line
        assert "flow contact_to_contacts is being synced by run 3f2a1b2c9d8e (test) since" in err
        with sync_world.office_client() as b:
            assert all_records(b, "contacts") == []  # nothing written
    finally:
        holder.release()
    code, _out, err = finish(sync_process())
    assert code == 0, err


def test_a_killed_holder_is_taken_over_when_its_lease_expires(sync_world: SyncWorld):
    """A holder killed with SIGKILL stops renewing; after the TTL the next sync proceeds."""
    script = (
        "import sys, time\n"
        "from crm_assets.engine.lease import FlowLease\n"
        "from crm_assets.engine.state import SyncState\n"
        "lease = FlowLease(SyncState(sys.argv[1]), 'contact_to_contacts', 'doomed', 'doomed', 2)\n"
        "lease.acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    doomed = subprocess.Popen(
        [sys.executable, "-c", script, sync_world.state_url], stdout=subprocess.PIPE, text=True
    )
    assert doomed.stdout is not None and doomed.stdout.readline().strip() == "held"
    state = SyncState(sync_world.state_url)
    with pytest.raises(LeaseHeld):  # alive and renewing: held past its TTL
        time.sleep(3)
        FlowLease(state, "contact_to_contacts", "probe", "probe", 2).acquire(wait=0)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    new_contacts(sync_world, 0)
    started = time.monotonic()
    code, _out, err = finish(sync_process(env={"CRM_SYNC_LEASE_WAIT": "10"}))
    print(f"\nafter kill -9 of the holder: sync exit {code} in {time.monotonic() - started:.1f} s")
    assert code == 0, err
    info = lease_info(state, "contact_to_contacts")
    assert info is not None and info.run_id != "doomed" and info.released_at is not None
    assert duplicates(sync_world) == {"custom_crm": 0, "crm_office": 0}
    with sync_world.office_client() as b:
        assert len(all_records(b, "contacts")) == NEW_CONTACTS


def test_a_writer_stopped_with_ctrl_c_gives_its_flow_back_as_it_exits(tmp_path: Path):
    """A process holding a flow (a run worker started by ``dagster api execute_run``, a
    script calling the engine) and stopped with Ctrl-C releases the lease on its way out:
    the next writer does not wait for the expiry."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    script = (
        "import sys, time\n"
        "from crm_assets.engine.lease import FlowLease, hold\n"
        "from crm_assets.engine.state import SyncState\n"
        "hold(FlowLease(SyncState(sys.argv[1]), 'contact_to_contacts', 'stopped', 'stopped'))\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGINT)
    assert holder.wait(timeout=30) != 0
    info = lease_info(SyncState(url), "contact_to_contacts")
    assert info is not None and info.run_id == "stopped" and info.released_at is not None
    FlowLease(SyncState(url), "contact_to_contacts", "next", "next").acquire(wait=0)


def test_a_run_that_fails_holding_flows_gives_them_back_before_it_is_reported(
    sync_world: SyncWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A sync run refused after it took its flows (here: started on a new data directory
    after a sync, so its state has no links) fails, and by the time Dagster reports it
    failed the flows are free: the ``--rebuild-links`` run the refusal asks for takes them
    at once."""
    with sync_world.custom_client() as a:  # no e-mail: only the state links them
        for i in range(5):
            a.create("contacts", {"FirstName": f"NoMail{i}", "LastName": "Custom"})
    assert execute_sync().success
    url = f"sqlite:///{tmp_path / 'elsewhere' / 'state.db'}"
    monkeypatch.setenv("CRM_SYNC_DATA_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("CRM_SYNC_STATE_URL", url)
    refused = execute_sync()
    assert not refused.success
    state = SyncState(url)
    for flow in sync_world.mappings:
        info = lease_info(state, flow)
        assert info is not None and info.run_id == refused.run_id, (flow, info)
        assert info.released_at is not None, (flow, info)
        FlowLease(state, flow, "next", "next run").acquire(wait=0)
