"""``make deploy-local`` driven end to end: the one-host deployment of docs/deploy.md.

Starts ``deploy/local.py`` (both embedded CRMs seeded small, ``dagster code-server
start``, ``dagster-daemon run`` and ``dagster-webserver``, each its own process, with
``deploy/dagster.yaml`` in a fresh ``DAGSTER_HOME``) against a fresh PostgreSQL database
for Dagster's storage (the sync state goes to the ``<db>_sync_state`` database the script
creates next to it; both dropped afterwards), then talks GraphQL to the webserver and REST
to the CRMs:

1. the change sensors start runs of both flows by themselves;
2. an edit through each CRM's REST API reaches the other CRM;
3. a run that is writing (100 contacts new in CRMOffice, to Custom CRM, whose client the
   code server paces at 10 requests/s) is killed: ``kill -9`` of its process, which the
   code server's gRPC server spawned (multiprocessing), found through the run's event
   "Started process for run (pid: …)". It is marked failed, and what runs next converges
   with no e-mail held twice (counted on both CRMs against their seeds);
4. over all runs: two runs of one flow (tag ``crm_sync/flow``) never overlap in time,
   runs of the two flows may (counted). A second run of the flow launched through
   GraphQL while the doomed run is in progress must queue behind it (and its crash).

Steps 2 and 3 share one round of runs (the edits are made with the new contacts), which
keeps the test near three minutes on a loaded two-core machine.

Needs ``CRM_SYNC_TEST_POSTGRES_URL`` (``.ci/postgres.sh`` prints one); skipped without it
on a developer's machine, failed in CI. Figures go to stdout (``pytest -s``); on a failure
the tails of every process's log are printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import unicodedata
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from embedded_fixtures import free_port, make_credentials

from crm_assets.crm_office.client import CrmOfficeClient
from crm_assets.crm_office.seed import demo_records as crm_office_seed
from crm_assets.custom_crm.client import CustomCrmClient
from crm_assets.custom_crm.seed import demo_records as custom_crm_seed

URL_VARIABLE = "CRM_SYNC_TEST_POSTGRES_URL"
SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "local.py"
SEED = 20
FLOWS = ("contact_to_contacts", "product_to_companies")
FLOW_TAG = "crm_sync/flow"
#: contacts created in CRMOffice for the run to be killed while it writes them to Custom CRM
NEW_CONTACTS = 100
#: the sync's Custom CRM client paces itself (requests/s), so writing them takes ~10 s
CUSTOM_CRM_RATE_LIMIT = "10"
LEASE_TTL, LEASE_WAIT = "15", "30"

READY_TIMEOUT = 150.0
FIRST_RUNS_TIMEOUT = 120.0
KILL_TIMEOUT = 90.0
FAILED_TIMEOUT = 90.0
CONVERGE_TIMEOUT = 150.0
#: no run queued or in progress for this long (more than a sensor interval): settled
QUIET = 6.0

RUNS = """
query Runs {
  runsOrError(limit: 500) {
    __typename
    ... on Runs {
      results {
        runId jobName status creationTime startTime endTime
        tags { key value }
      }
    }
  }
}
"""

RUN_EVENTS = """
query Events($runId: ID!) {
  logsForRun(runId: $runId, limit: 2000) {
    __typename
    ... on EventConnection {
      events { __typename ... on MessageEvent { message timestamp } }
    }
  }
}
"""

LAUNCH_RUN = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}
"""

ACTIVE = {"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"}


def server_url() -> str:
    url = os.environ.get(URL_VARIABLE, "")
    if not url:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{URL_VARIABLE} is not set in CI: .ci/run starts PostgreSQL for it")
        pytest.skip(f"{URL_VARIABLE} not set (run .ci/postgres.sh and export its output)")
    return url


@dataclass
class Run:
    run_id: str
    job: str
    status: str
    created: float
    start: float | None
    end: float | None
    tags: dict[str, str]

    @property
    def flow(self) -> str | None:
        return self.tags.get(FLOW_TAG)


@dataclass
class Deployed:
    """The running ``deploy/local.py`` and what a test needs to talk to its processes."""

    process: subprocess.Popen[bytes]
    directory: Path
    log_path: Path
    ports: dict[str, int]
    credentials: dict[str, dict[str, str]]
    t0: float = field(default_factory=time.monotonic)

    @property
    def ui(self) -> str:
        return f"http://127.0.0.1:{self.ports['webserver']}"

    # -- logs --------------------------------------------------------------------------------
    def tails(self, lines: int = 40) -> str:
        paths = [self.log_path, *sorted((self.directory / "logs").glob("*.log"))]
        parts = []
        for path in paths:
            text = path.read_text(errors="replace") if path.exists() else "(no log)"
            parts.append(f"--- {path.name} (last {lines} lines) ---")
            parts.extend(text.splitlines()[-lines:])
        return "\n".join(parts)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"deploy/local.py exited with {self.process.returncode}")

    def pids(self) -> dict[str, int]:
        path = self.directory / "pids.json"
        return json.loads(path.read_text()) if path.exists() else {}

    # -- GraphQL -----------------------------------------------------------------------------
    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = httpx.post(
            f"{self.ui}/graphql", json={"query": query, "variables": variables or {}}, timeout=30
        )
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body
        return dict(body["data"])

    def runs(self) -> list[Run]:
        data = self.graphql(RUNS)["runsOrError"]
        assert data["__typename"] == "Runs", data
        return [
            Run(
                r["runId"],
                r["jobName"],
                r["status"],
                r["creationTime"],
                r["startTime"],
                r["endTime"],
                {t["key"]: t["value"] for t in r["tags"]},
            )
            for r in data["results"]
        ]

    def launch(self, job: str) -> str:
        """Launch a job's run as the UI's Launch button does (it queues)."""
        params = {
            "selector": {
                "repositoryLocationName": "crm_assets",
                "repositoryName": "__repository__",
                "jobName": job,
            },
            "runConfigData": {},
        }
        result = self.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
        assert result["__typename"] == "LaunchRunSuccess", result
        return str(result["run"]["runId"])

    def messages(self, run_id: str) -> list[str]:
        data = self.graphql(RUN_EVENTS, {"runId": run_id})["logsForRun"]
        return [e.get("message") or "" for e in data.get("events", [])]

    # -- the CRMs ----------------------------------------------------------------------------
    def custom_crm(self) -> CustomCrmClient:
        return CustomCrmClient(
            f"http://127.0.0.1:{self.ports['custom_crm']}",
            self.credentials["custom-crm"]["api_key"],
        )

    def crm_office(self) -> CrmOfficeClient:
        creds = self.credentials["crm-office"]
        return CrmOfficeClient(
            f"http://127.0.0.1:{self.ports['crm_office']}",
            creds["client_id"],
            creds["client_secret"],
        )

    def contacts(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Live contacts of Custom CRM and of CRMOffice."""
        with self.custom_crm() as a, self.crm_office() as b:
            custom = [r for page in a.pages("contacts") for r in page if not r["Deleted"]]
            office = [r for page in b.pages("contacts") for r in page]
        return custom, office

    # -- waiting -----------------------------------------------------------------------------
    def wait_for(self, what: str, done: Callable[[], Any], timeout: float, poll: float = 1.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                result = done()
                if result:
                    return result
            time.sleep(poll)
        raise AssertionError(f"{what}: not within {timeout:.0f} s")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


class Databases:
    """Fresh databases on the test server, dropped afterwards."""

    def __init__(self, url: str) -> None:
        self.url = sa.make_url(url)
        self.admin = sa.create_engine(self.url, isolation_level="AUTOCOMMIT")

    def fresh(self) -> str:
        name = f"crm_deploy_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        return name

    def url_of(self, name: str, driver: str) -> str:
        url = self.url.set(drivername=driver, database=name)
        return url.render_as_string(hide_password=False)

    def drop(self, *names: str) -> None:
        with self.admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def exists(self, name: str) -> bool:
        with self.admin.connect() as conn:
            query = sa.text("SELECT 1 FROM pg_database WHERE datname = :n")
            return conn.execute(query, {"n": name}).first() is not None


def killpg_all(deployed: Deployed) -> None:
    """Whatever the script left running (it stops its children itself; this is the net)."""
    for pid in deployed.pids().values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def deployed(tmp_path: Path) -> Iterator[Deployed]:
    databases = Databases(server_url())
    name = databases.fresh()
    credentials = {s: make_credentials(s) for s in ("custom-crm", "crm-office")}
    ports = {k: free_port() for k in ("webserver", "code_server", "custom_crm", "crm_office")}
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CRM_", "CUSTOM_CRM_", "HUBSPOT_", "DAGSTER_"))
    }
    env.update(
        DAGSTER_PG_URL=databases.url_of(name, "postgresql+psycopg2"),
        CUSTOM_CRM_API_KEY=credentials["custom-crm"]["api_key"],
        CRM_OFFICE_CLIENT_ID=credentials["crm-office"]["client_id"],
        CRM_OFFICE_CLIENT_SECRET=credentials["crm-office"]["client_secret"],
        CUSTOM_CRM_RATE_LIMIT=CUSTOM_CRM_RATE_LIMIT,
        CRM_SYNC_SENSOR_INTERVAL="5",
        CRM_SYNC_LEASE_TTL=LEASE_TTL,
        CRM_SYNC_LEASE_WAIT=LEASE_WAIT,
        PYTHONUNBUFFERED="1",
    )
    directory = tmp_path / "deploy"
    cmd = [sys.executable, str(SCRIPT), "--dir", str(directory), "--seed", str(SEED)]
    cmd += ["--webserver-port", str(ports["webserver"])]
    cmd += ["--code-server-port", str(ports["code_server"])]
    cmd += ["--custom-crm-port", str(ports["custom_crm"])]
    cmd += ["--crm-office-port", str(ports["crm_office"])]
    log_path = tmp_path / "deploy-local.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deployed = Deployed(process, directory, log_path, ports, credentials)
    try:
        yield deployed
    finally:
        if process.poll() is None:  # the test failed before stopping it
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        killpg_all(deployed)
        databases.drop(name, f"{name}_sync_state")
        databases.admin.dispose()


@contextlib.contextmanager
def explained(deployed: Deployed) -> Iterator[None]:
    """On any failure: the tails of every process's log, then the failure."""
    try:
        yield
    except BaseException:
        print(f"\n{deployed.tails()}\n", flush=True)
        raise


# -- reading the results ---------------------------------------------------------------------
def canonical(email: str | None) -> str:
    return unicodedata.normalize("NFC", (email or "").strip().lower())


def email_counts(records: list[dict[str, Any]], key: str) -> Counter[str]:
    return Counter(canonical(r.get(key)) for r in records if r.get(key))


def extra_copies(now: Counter[str], seeded: Counter[str]) -> dict[str, int]:
    """E-mails a CRM holds more often than its seed did (at most once if not seeded)."""
    return {e: n for e, n in now.items() if n > max(seeded.get(e, 0), 1)}


def overlaps(runs: list[Run], now: float) -> tuple[list[tuple[Run, Run]], list[tuple[Run, Run]]]:
    """Pairs of started runs whose [start, end] intersect: (same flow, different flows)."""
    started = sorted((r for r in runs if r.start and r.flow), key=lambda r: r.start or 0)
    same, different = [], []
    for i, a in enumerate(started):
        for b in started[i + 1 :]:
            if (b.start or 0) < (a.end or now):
                (same if a.flow == b.flow else different).append((a, b))
    return same, different


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        status = Path(f"/proc/{pid}/status").read_text()
        pid = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        chain.append(pid)
    return chain


# -- the test --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_deploy_local_runs_the_sync_on_postgres_and_survives_a_killed_run(deployed: Deployed):
    with explained(deployed):
        drive(deployed)


def drive(d: Deployed) -> None:
    figures: list[str] = []

    def figure(text: str) -> None:
        figures.append(text)
        print(f"[{d.elapsed():6.1f} s] {text}", flush=True)

    # -- up --------------------------------------------------------------------------------
    def ready() -> bool:
        return "deploy-local: ready:" in d.log_path.read_text(errors="replace")

    d.wait_for("deploy/local.py ready", ready, READY_TIMEOUT)
    ready_at = time.time()
    figure(f"deployment ready: {d.elapsed():.1f} s after starting deploy/local.py")
    pids = d.pids()
    assert set(pids) == {"custom-crm", "crm-office", "code-server", "daemon", "webserver"}, pids
    assert (d.directory / "dagster_home" / "dagster.yaml").read_text() == (
        SCRIPT.parent / "dagster.yaml"
    ).read_text()

    # -- 1. the sensors start runs of both flows -------------------------------------------
    def first_runs_done() -> list[Run] | None:
        runs = d.runs()
        done = {r.flow for r in runs if r.status == "SUCCESS"}
        return runs if set(FLOWS) <= done else None

    runs = d.wait_for("a successful run of each flow", first_runs_done, FIRST_RUNS_TIMEOUT)
    by_sensor = [r for r in runs if "dagster/sensor_name" in r.tags]
    assert {r.flow for r in by_sensor} >= set(FLOWS), [(r.job, r.tags) for r in runs]
    first = min(r.created for r in by_sensor)
    figure(
        f"sensors started {len(by_sensor)} run(s), the first {first - ready_at:+.1f} s from "
        f"ready; both flows synced {d.elapsed():.1f} s after start ({len(runs)} runs so far)"
    )
    custom, office = d.contacts()
    seeded_custom = email_counts(custom_crm_seed(SEED)["contacts"], "Email")
    seeded_office = email_counts(crm_office_seed(SEED)["contacts"], "email")
    assert set(email_counts(custom, "Email")) == set(email_counts(office, "email"))

    # -- 2. and 3. an edit in each CRM, and new contacts for a run to be killed writing -----
    # (one round of runs for both, to keep the test short: the edits travel with the run
    # that is killed, and with what runs after it)
    once_custom, once_office = email_counts(custom, "Email"), email_counts(office, "email")
    shared = sorted(e for e in once_custom if once_custom[e] == 1 and once_office.get(e) == 1)
    assert len(shared) >= 2, shared
    in_custom = next(r for r in custom if canonical(r["Email"]) == shared[0])
    in_office = next(r for r in office if canonical(r["email"]) == shared[1])
    title_a = f"Edited in Custom CRM {uuid.uuid4().hex[:6]}"
    title_b = f"Edited in CRMOffice {uuid.uuid4().hex[:6]}"
    custom_before = len(custom)
    new_emails = [
        f"deploy-kill-{i}-{uuid.uuid4().hex[:6]}@example.com" for i in range(NEW_CONTACTS)
    ]
    edited = time.monotonic()
    # no concurrency tokens: a run still echoing the first sync may touch these records
    with d.custom_crm() as a:
        a.update("contacts", in_custom["Id"], {"Title": title_a})
    with d.crm_office() as b:
        b.replace("contacts", in_office["id"], {**in_office, "title": title_b})
        for chunk in range(0, NEW_CONTACTS, 100):
            items = [
                {"givenName": f"Kill{i}", "familyName": "Test", "email": email}
                for i, email in enumerate(new_emails[chunk : chunk + 100], start=chunk)
            ]
            results = b.batch("contacts", create=items)
            assert all(r["status"] == 201 for r in results), results[:3]
    seen: dict[str, float] = {}

    def edits_arrived(custom: list[dict[str, Any]], office: list[dict[str, Any]]) -> bool:
        if any(canonical(r["email"]) == shared[0] and r["title"] == title_a for r in office):
            seen.setdefault("Custom CRM -> CRMOffice", time.monotonic() - edited)
        if any(canonical(r["Email"]) == shared[1] and r["Title"] == title_b for r in custom):
            seen.setdefault("CRMOffice -> Custom CRM", time.monotonic() - edited)
        return len(seen) == 2

    def custom_count() -> int:
        with d.custom_crm() as a:
            return sum(1 for page in a.pages("contacts") for r in page if not r["Deleted"])

    created_at = time.monotonic()
    runs_before = {r.run_id for r in d.runs()}
    killed: dict[str, Any] = {}

    checked = {"edits": 0.0}
    extra: dict[str, str] = {}

    def kill_while_writing() -> bool:
        if time.monotonic() - checked["edits"] > 1:  # edits travel meanwhile: when they land
            checked["edits"] = time.monotonic()
            edits_arrived(*d.contacts())
        started = [
            r
            for r in d.runs()
            if r.run_id not in runs_before and r.flow == FLOWS[0] and r.status == "STARTED"
        ]
        for run in started:
            found = [
                re.search(r"Started process for run \(pid: (\d+)\)", m)
                for m in d.messages(run.run_id)
            ]
            pid = next((int(m.group(1)) for m in found if m), None)
            if pid is None:
                continue
            if "run_id" not in extra:  # a second run of the flow, from the UI: it must queue
                extra["run_id"] = d.launch(f"sync_{FLOWS[0]}")
            written = custom_count() - custom_before
            if written <= 0:
                continue  # not writing yet
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            chain = ancestors(pid)
            waiting = {r.run_id: r.status for r in d.runs()}[extra["run_id"]]
            os.kill(pid, signal.SIGKILL)
            killed.update(
                run=run,
                pid=pid,
                written=written,
                cmdline=cmdline,
                chain=chain,
                at=time.monotonic(),
                waiting=waiting,
            )
            return True
        return False

    d.wait_for("a contact run writing to Custom CRM", kill_while_writing, KILL_TIMEOUT, poll=0.2)
    run, pid = killed["run"], killed["pid"]
    code_server = d.pids()["code-server"]
    figure(
        f"killed run {run.run_id[:8]} (pid {pid}) {killed['at'] - created_at:.1f} s after "
        f"creating {NEW_CONTACTS} contacts in CRMOffice, with {killed['written']} of them "
        f"written to Custom CRM; its command line: {killed['cmdline'][:120]!r}; "
        f"ancestors {killed['chain'][:4]} (code server {code_server})"
    )
    assert code_server in killed["chain"], "the run process is not under the code server"
    figure(
        f"launched {extra['run_id'][:8]} of {FLOWS[0]} through GraphQL while it ran: "
        f"{killed['waiting']} when the kill came"
    )
    assert killed["waiting"] == "QUEUED", killed["waiting"]
    edits_arrived(*d.contacts())
    before_kill = dict(seen)

    def marked_failed() -> Run | None:
        now = {r.run_id: r for r in d.runs()}
        return now[run.run_id] if now[run.run_id].status == "FAILURE" else None

    failed = d.wait_for(f"run {run.run_id[:8]} marked failed", marked_failed, FAILED_TIMEOUT)
    marked_after = time.monotonic() - killed["at"]
    messages = d.messages(run.run_id)
    by_code_server = [m.split(". ")[0] for m in messages if "Run execution process for" in m]
    by_monitoring = [m for m in messages if "monitor" in m.lower()]
    figure(
        f"marked FAILURE {marked_after:.1f} s after the kill, by "
        + ("the code server" if by_code_server else "run monitoring" if by_monitoring else "?")
        + f": {(by_code_server or by_monitoring or messages[-2:])}"
    )
    assert failed.end is not None

    # -- the runs after it converge, no e-mail held twice -----------------------------------
    quiet: dict[str, float] = {}

    def converged() -> bool:
        if any(r.status in ACTIVE for r in d.runs()):
            quiet.clear()
            return False
        if time.monotonic() - quiet.setdefault("since", time.monotonic()) < QUIET:
            return False
        custom, office = d.contacts()
        a, b = email_counts(custom, "Email"), email_counts(office, "email")
        arrived = edits_arrived(custom, office)
        return arrived and all(canonical(e) in a for e in new_emails) and set(a) == set(b)

    d.wait_for("convergence after the killed run", converged, CONVERGE_TIMEOUT)
    converge_after = time.monotonic() - killed["at"]
    custom, office = d.contacts()
    a, b = email_counts(custom, "Email"), email_counts(office, "email")
    runs = d.runs()
    later = sorted(
        (r for r in runs if r.flow == FLOWS[0] and r.created > failed.created),
        key=lambda r: r.created,
    )
    retries = [r for r in runs if r.tags.get("dagster/parent_run_id") == run.run_id]
    figure(
        f"converged {converge_after:.1f} s after the kill: Custom CRM {len(custom)} contacts, "
        f"CRMOffice {len(office)}; later runs of {FLOWS[0]}: "
        + ", ".join(f"{r.run_id[:8]} {r.status}" for r in later)
        + f"; retries of the killed run: {[(r.run_id[:8], r.status) for r in retries]}"
    )
    figure(
        "edit to visible: "
        + ", ".join(
            f"{k} {v:.1f} s ({'before' if k in before_kill else 'after'} the kill)"
            for k, v in seen.items()
        )
    )
    assert extra_copies(a, seeded_custom) == {}, "Custom CRM holds e-mails twice"
    assert extra_copies(b, seeded_office) == {}, "CRMOffice holds e-mails twice"
    assert all(a[canonical(e)] == 1 and b[canonical(e)] == 1 for e in new_emails)
    assert any(r.status == "SUCCESS" for r in later), [(r.run_id, r.status) for r in later]
    # run_retries (deploy/dagster.yaml) starts the killed run once more, and it succeeds
    assert [r.status for r in retries] == ["SUCCESS"], [(r.run_id, r.status) for r in retries]

    # -- 4. one run per flow at a time, the flows side by side --------------------------------
    now = time.time()
    same, different = overlaps(runs, now)
    longest = max(
        (min(x.end or now, y.end or now) - (y.start or now) for x, y in different), default=0.0
    )
    per_flow = Counter(r.flow for r in runs if r.start)
    # runs created while a run of their flow was in progress, started only after it ended
    waited = [
        b
        for b in runs
        for a in runs
        if a is not b
        and a.flow == b.flow
        and a.start
        and b.start
        and a.start <= b.created < (a.end or now)
        and b.start >= (a.end or now)
    ]
    statuses = Counter(r.status for r in runs)
    figure(
        f"runs: {len(runs)} ({dict(statuses)}), started per flow {dict(per_flow)}; "
        f"overlapping pairs: same flow {len(same)}, different flows {len(different)} "
        f"(longest {longest:.1f} s); runs that waited for a run of their own flow: {len(waited)}"
    )
    assert same == [], [(x.run_id, x.start, x.end, y.run_id, y.start) for x, y in same]
    assert extra["run_id"] in {r.run_id for r in waited}, "the launched run did not queue"

    # -- Ctrl-C stops every process, and all they started -----------------------------------
    pids = d.pids()
    stopping = time.monotonic()
    d.process.send_signal(signal.SIGINT)
    code = d.process.wait(timeout=90)
    deadline = time.monotonic() + 10
    while (left := [n for n, pid in pids.items() if group_alive(pid)]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    figure(f"SIGINT: deploy/local.py exited {code} in {time.monotonic() - stopping:.1f} s")
    assert code == 0
    assert left == [], f"still running after the script stopped: {left}"
    print("\nfigures:\n  " + "\n  ".join(figures))
