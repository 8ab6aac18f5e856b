"""The demo as a user sees it: the Dagster UI in a real (headless) Chromium.

Starts ``crm-assets demo`` (both embedded CRMs, seeded, and the Dagster UI) on free
ports, waits until the change sensors' first runs have verified the contact flow,
then opens the asset graph and the checks of ``contact_to_contacts/verified`` in
Debian's Chromium, driven by Playwright (never ``playwright install``: no browser
download). Then the operator's view, each step through the CRMs' own APIs, the
sensors and the UI:

- a breaker trip: a bulk edit of most contacts' Title in Custom CRM; the sensor's run
  fails before writing, its failure names the reason and ``force: true``;
- forcing it from the job's launchpad (run config typed into the editor, Launch Run);
- a dead letter: a product CRMOffice refuses (orgNr of 5 digits) shows on
  ``product_to_companies/dead_letters``; fixed in Custom CRM, then
  ``crm-assets dead-letters retry`` writes it;
- a conflict: the same field edited in both CRMs before a sync shows on
  ``contact_to_contacts/conflicts`` with both values and the winner.

Screenshots go to ``tmp_path``; with ``UPDATE_SCREENSHOTS=1`` also to
``docs/screenshots/`` (the README shows them).

Chromium missing: skipped on a developer's machine, failed in CI (``CI=true``),
where ``.ci/run`` installs it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from embedded_fixtures import free_port

from crm_assets.connectors import CONNECTORS
from crm_assets.settings import DEFAULTS

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
FLOW = "contact_to_contacts"
VERIFIED = [FLOW, "verified"]
#: The flow's assets, as the asset graph labels them.
FLOW_ASSETS = ["dataflow", "mapped", "reconciled", "writes_to_crm_office", "verified"]

#: Generous: on a loaded 2-core machine the CRMs start one after the other, then the UI.
UI_TIMEOUT = 240.0
RUN_TIMEOUT = 240.0
#: Launch ``sync_all`` ourselves if the sensors have not verified the flow by then.
SENSOR_GRACE = 45.0
#: No run queued or running (and, paused, no tick) for this long, more than two loops of
#: the sensor daemon (5 s): the demo settled, the reference follow-ups included (a flow's
#: run that linked records starts its referencing flows' runs on the next tick).
QUIET = 12.0
SETTLE_TIMEOUT = 90.0
#: Wide enough for the asset graph to show each node's details (status, checks).
VIEWPORT = {"width": 1920, "height": 860}

#: What the Dagster UI stores when its community dialog is skipped (useStateWithStorage).
NUX_DISMISSED = "window.localStorage.setItem('communityNux', JSON.stringify('1'));"

LATEST_MATERIALIZATION = """
query Latest($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) {
    __typename
    ... on Asset { assetMaterializations(limit: 1) { runId timestamp } }
  }
}
"""

ACTIVE_RUNS = """
query Active {
  runsOrError(filter: {statuses: [QUEUED, NOT_STARTED, STARTING, STARTED, CANCELING]}) {
    __typename
    ... on Runs { results { runId } }
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

# -- the operator's view ------------------------------------------------------------------------
REPOSITORY = {"repositoryLocationName": "crm_assets", "repositoryName": "__repository__"}
SENSORS = ("custom_crm_changes", "crm_office_changes", "reference_followups")
#: Taller pages for the operator's screenshots (run log, launchpad, record tables).
OPERATOR_VIEWPORT = {"width": 1920, "height": 1080}
#: From an edit to its run finished: a sensor tick, the queue, a run process starting
#: (10-20 s on a loaded 2-core machine) and the run itself.
OPERATOR_RUN_TIMEOUT = 300.0
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")
WRITES_STEP = f"{FLOW}__writes"
#: The run config the breaker's message asks for, as typed into the launchpad.
FORCE_CONFIG = f"ops:\n  {FLOW}__reconciled:\n    config:\n      force: true\n"
#: The Title a bulk edit gives most contacts (more than half: the breaker trips).
BULK_TITLE = "Account Manager (bulk edit)"
DEAD_FLOW = "product_to_companies"
#: A product CRMOffice refuses as a company: orgNr must be exactly 9 digits.
DEAD_PRODUCT = {"Name": "Fjordlys Dead Letter AS", "ProductNumber": 12345}
FIXED_PRODUCT_NUMBER = 123456789
REFUSAL = "orgNr: must be exactly 9 digits"
CUSTOM_TITLE = "Head of Sales (edited in Custom CRM)"
OFFICE_TITLE = "Sales Director (edited in CRMOffice)"
#: Between the two edits of a conflict: the later one (CRMOffice's) is newer by this much.
CONFLICT_GAP = 3.0

RUNS_OF_JOB = """
query RunsOfJob($filter: RunsFilter!) {
  runsOrError(filter: $filter) {
    __typename
    ... on Runs { results { runId status creationTime tags { key value } } }
  }
}
"""

RUN_EVENTS = """
query RunEvents($runId: ID!, $after: String) {
  runOrError(runId: $runId) {
    __typename
    ... on Run {
      status
      runConfigYaml
      eventConnection(afterCursor: $after) {
        cursor
        hasMore
        events {
          __typename
          ... on ExecutionStepFailureEvent { stepKey error { message } }
          ... on RunFailureEvent { message }
        }
      }
    }
  }
}
"""

SENSOR = """
query Sensor($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor { id sensorState { status ticks(limit: 1) { status } } }
  }
}
"""

STOP_SENSOR = """
mutation StopSensor($id: String) {
  stopSensor(id: $id) { __typename ... on PythonError { message } }
}
"""

START_SENSOR = """
mutation StartSensor($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) { __typename ... on PythonError { message } }
}
"""

LATEST_RECORDS = """
query LatestRecords($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) {
    __typename
    ... on Asset {
      assetMaterializations(limit: 1) {
        runId
        metadataEntries {
          label
          ... on MarkdownMetadataEntry { mdStr }
          ... on IntMetadataEntry { intValue }
        }
      }
    }
  }
}
"""


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    message = f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Demo:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    #: the demo's environment: base URLs, data directory, Dagster home (the CLI's too)
    env: dict[str, str]

    def setting(self, name: str) -> str:
        """A configuration variable as the demo sees it (unset: its demo default)."""
        return self.env.get(name) or DEFAULTS[name]

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def graphql(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        response = httpx.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=60
        )
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body
        return dict(body["data"])

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"the demo exited with {self.process.returncode}:\n{self.log_tail()}")


def demo_command() -> list[str]:
    script = Path(sys.executable).with_name("crm-assets")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "crm_assets.cli"]


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    """``crm-assets demo --seed 60`` on free ports, its data and Dagster home in tmp_path."""
    port = free_port()
    settings = {s.name for c in CONNECTORS for s in c.settings}
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in settings and not k.startswith(("CRM_", "CUSTOM_CRM_"))
    }
    for connector in CONNECTORS:  # the demo serves every connector's CRM: each on a free port
        base_url = connector.setting("base_url")
        if base_url is not None:
            env[base_url.name] = f"http://127.0.0.1:{free_port()}"
    env.update(
        CRM_SYNC_DATA_DIR=str(tmp_path / "data"),
        DAGSTER_HOME=str(tmp_path / "dagster_home"),
        CRM_SYNC_SENSOR_INTERVAL="5",
        PYTHONUNBUFFERED="1",
    )
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*demo_command(), "demo", "--port", str(port), "--seed", "60"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield Demo(process, f"http://127.0.0.1:{port}", log_path, env)
    finally:
        # the demo stops its children (each in its own session) on SIGTERM
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def wait_for_ui(demo: Demo) -> None:
    deadline = time.monotonic() + UI_TIMEOUT
    while time.monotonic() < deadline:
        demo.check_alive()
        try:
            if httpx.get(f"{demo.url}/server_info", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the Dagster UI did not answer within {UI_TIMEOUT:.0f} s:\n{demo.log_tail()}")


def verified_materialized(demo: Demo) -> bool:
    data = demo.graphql(LATEST_MATERIALIZATION, {"key": {"path": VERIFIED}})
    asset = data["assetOrError"]
    return asset["__typename"] == "Asset" and bool(asset["assetMaterializations"])


def launch_job(demo: Demo, job: str, run_config: dict[str, Any] | None = None) -> str:
    """Launch a job through GraphQL; its run's id."""
    params = {"selector": {**REPOSITORY, "jobName": job}, "runConfigData": run_config or {}}
    result = demo.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return str(result["run"]["runId"])


def launch_sync_all(demo: Demo) -> None:
    launch_job(demo, "sync_all")


def wait_for_verified(demo: Demo) -> None:
    """Until a run (the sensors', or our own ``sync_all`` as a fallback) verified the flow."""
    start = time.monotonic()
    launched = False
    while time.monotonic() - start < RUN_TIMEOUT:
        demo.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            if verified_materialized(demo):
                return
            if not launched and time.monotonic() - start > SENSOR_GRACE:
                launch_sync_all(demo)
                launched = True
        time.sleep(1)
    pytest.fail(f"{'/'.join(VERIFIED)} not materialized in {RUN_TIMEOUT:.0f} s:\n{demo.log_tail()}")


def until_quiet(demo: Demo, busy: Callable[[], str]) -> str:
    """Until ``busy`` (what still moves, in words; empty when nothing) has said nothing for
    QUIET on end: "" then, or what still moved at SETTLE_TIMEOUT."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    quiet_since: float | None = None
    moving = ""
    while time.monotonic() < deadline:
        demo.check_alive()
        moving = busy()
        if moving:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET:
            return ""
        time.sleep(1)
    return moving or "not quiet for long enough"


def active_runs(demo: Demo) -> str:
    """The runs queued or running, in words (empty: none)."""
    runs = demo.graphql(ACTIVE_RUNS, {})["runsOrError"]
    return "" if runs["__typename"] == "Runs" and not runs["results"] else f"runs active {runs}"


def wait_until_quiet(demo: Demo) -> None:
    """Until no run is queued or running for a while, so the UI shows settled results
    (echo runs of the sync's own writes die out after a round or two)."""
    # still busy at the end: go on, the assertions below say what is not shown
    until_quiet(demo, lambda: active_runs(demo))


def keep_screenshot(path: Path) -> None:
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / path.name)


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    """Says how long a step took (``-s`` shows it): the test's timings on this machine."""
    start = time.monotonic()
    yield
    print(f"\n{what}: {time.monotonic() - start:.0f} s", flush=True)


def screenshot(page: Page, tmp_path: Path, name: str) -> None:
    """The page as it is now, as ``name`` (kept in docs/screenshots/ when asked)."""
    from playwright.sync_api import expect

    page.wait_for_timeout(1000)  # let the last rendering settle
    expect(page.get_by_text("Join the Dagster community")).to_be_hidden()
    path = tmp_path / name
    page.screenshot(path=str(path))
    keep_screenshot(path)


# -- the operator's view: runs, sensors and record tables over GraphQL ---------------------------
def runs_of(demo: Demo, job: str, since: float) -> list[dict[str, Any]]:
    """The job's runs created after ``since`` (epoch seconds), newest first."""
    data = demo.graphql(RUNS_OF_JOB, {"filter": {"pipelineName": job, "createdAfter": since}})
    runs = data["runsOrError"]
    assert runs["__typename"] == "Runs", runs
    return sorted(runs["results"], key=lambda r: r["creationTime"], reverse=True)


def wait_for_runs(demo: Demo, job: str, since: float) -> list[dict[str, Any]]:
    """Until a run of ``job`` created after ``since`` exists (the sensors', or our own
    launch after SENSOR_GRACE) and every such run has finished: those runs, newest first."""
    start = time.monotonic()
    launched = False
    runs: list[dict[str, Any]] = []
    while time.monotonic() - start < OPERATOR_RUN_TIMEOUT:
        demo.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            runs = runs_of(demo, job, since)
            if runs and all(run["status"] in FINISHED for run in runs):
                return runs
            if not runs and not launched and time.monotonic() - start > SENSOR_GRACE:
                launch_job(demo, job)
                launched = True
        time.sleep(1)
    pytest.fail(
        f"no finished run of {job} within {OPERATOR_RUN_TIMEOUT:.0f} s "
        f"(runs: {[(r['runId'][:8], r['status']) for r in runs]}):\n{demo.log_tail()}"
    )


def wait_for_run(demo: Demo, run_id: str) -> str:
    """Until the run has finished: its status."""
    deadline = time.monotonic() + OPERATOR_RUN_TIMEOUT
    status = "?"
    while time.monotonic() < deadline:
        demo.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            data = demo.graphql(RUNS_OF_JOB, {"filter": {"runIds": [run_id]}})["runsOrError"]
            status = data["results"][0]["status"] if data.get("results") else "not found"
            if status in FINISHED:
                return status
        time.sleep(1)
    pytest.fail(f"run {run_id} still {status} after {OPERATOR_RUN_TIMEOUT:.0f} s")


def run_events(demo: Demo, run_id: str) -> tuple[str, str, list[tuple[str | None, str]]]:
    """A run's status, its run config (YAML) and its failures: ``(step, message)`` of each
    step failure (the step's error) and ``(None, message)`` of the run failure."""
    failures: list[tuple[str | None, str]] = []
    after = None
    while True:
        run = demo.graphql(RUN_EVENTS, {"runId": run_id, "after": after})["runOrError"]
        assert run["__typename"] == "Run", run
        connection = run["eventConnection"]
        for event in connection["events"]:
            if event["__typename"] == "ExecutionStepFailureEvent":
                failures.append((event["stepKey"], event["error"]["message"]))
            elif event["__typename"] == "RunFailureEvent":
                failures.append((None, event["message"]))
        if not connection["hasMore"]:
            return run["status"], run["runConfigYaml"], failures
        after = connection["cursor"]


def sensor(demo: Demo, name: str) -> dict[str, Any]:
    data = demo.graphql(SENSOR, {"selector": {**REPOSITORY, "sensorName": name}})
    found = data["sensorOrError"]
    assert found["__typename"] == "Sensor", found
    return dict(found)


@contextlib.contextmanager
def sensors_paused(demo: Demo) -> Iterator[None]:
    """The sensors stopped (as their toggle in the UI does), no tick under way and no run
    queued or running, for QUIET on end: every edit made meanwhile reaches the same run,
    which the sensors start once they are back on (their cursors are kept).

    A daemon loop that read a sensor as running just before the stop still ticks it, and
    writing that tick's start sets the sensor running again (Dagster writes the state it
    read), so the stop is repeated until the sensors stay stopped and quiet."""

    def busy() -> str:
        states = {name: sensor(demo, name) for name in SENSORS}
        running = [n for n, s in states.items() if s["sensorState"]["status"] != "STOPPED"]
        for name in running:
            stopped = demo.graphql(STOP_SENSOR, {"id": states[name]["id"]})["stopSensor"]
            assert stopped["__typename"] == "StopSensorMutationResult", stopped
        # ticks first: a finished tick's runs are queued already, so the runs see them
        ticking = [
            name
            for name, s in states.items()
            if any(t["status"] == "STARTED" for t in s["sensorState"]["ticks"])
        ]
        moving = [
            f"running again {running}" if running else "",
            f"ticking {ticking}" if ticking else "",
            active_runs(demo),
        ]
        return "; ".join(m for m in moving if m)

    started: list[dict[str, Any]] = []
    try:
        moving = until_quiet(demo, busy)
        if moving:
            pytest.fail(f"sensors stopped, but still {moving}")
        yield
    finally:
        for name in SENSORS:
            selector = {**REPOSITORY, "sensorName": name}
            started.append(demo.graphql(START_SENSOR, {"selector": selector})["startSensor"])
    assert all(s["__typename"] == "Sensor" for s in started), started


def latest_records(demo: Demo, flow: str, name: str) -> tuple[str, list[dict[str, str]], int]:
    """The latest materialization of ``<flow>/<name>``: its run, the rows of its Markdown
    table (as the UI shows them) and its row count."""
    data = demo.graphql(LATEST_RECORDS, {"key": {"path": [flow, name]}})["assetOrError"]
    assert data["__typename"] == "Asset", data
    assert data["assetMaterializations"], f"{flow}/{name} was never materialized"
    latest = data["assetMaterializations"][0]
    entries = {e["label"]: e for e in latest["metadataEntries"]}
    rows = markdown_rows(entries["table"]["mdStr"])
    return latest["runId"], rows, int(entries["dagster/row_count"]["intValue"])


def markdown_rows(table: str) -> list[dict[str, str]]:
    """The rows of a Markdown table (``_none_``: no rows), by column name."""
    lines = [line.strip() for line in table.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return []

    def cells(line: str) -> list[str]:
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]

    header = cells(lines[0])
    return [dict(zip(header, cells(line), strict=True)) for line in lines[2:]]


# -- the operator's view: the CRMs over their own REST APIs ---------------------------------------
@dataclass
class Crms:
    """The demo's two CRMs, as a user's script reaches them: Custom CRM by its API key,
    CRMOffice by an OAuth2 client-credentials token."""

    custom: httpx.Client
    office: httpx.Client

    def custom_all(self, obj: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
            body = ok(self.custom.get(f"/{obj}", params=params)).json()
            items += body["items"]
            cursor = body.get("nextCursor")
            if not cursor:
                return items

    def office_all(self, obj: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            page = ok(self.office.get(f"/{obj}", params={"skip": len(items), "take": 1000}))
            body = page.json()
            items += body["items"]
            if not body["items"] or len(items) >= body["totalCount"]:
                return items


def ok(response: httpx.Response) -> httpx.Response:
    """The response, or a failure naming the request and the CRM's answer."""
    if response.is_error:
        pytest.fail(
            f"{response.request.method} {response.request.url}: "
            f"HTTP {response.status_code} {response.text[:500]}"
        )
    return response


@contextlib.contextmanager
def crm_clients(demo: Demo) -> Iterator[Crms]:
    office_url = demo.setting("CRM_OFFICE_BASE_URL")
    token = ok(
        httpx.post(
            f"{office_url}/connect/token",
            data={
                "grant_type": "client_credentials",
                "client_id": demo.setting("CRM_OFFICE_CLIENT_ID"),
                "client_secret": demo.setting("CRM_OFFICE_CLIENT_SECRET"),
                "scope": "crmoffice",
            },
            timeout=30,
        )
    ).json()["access_token"]
    with (
        httpx.Client(
            base_url=f"{demo.setting('CUSTOM_CRM_BASE_URL')}/api",
            headers={"Authorization": f"Bearer {demo.setting('CUSTOM_CRM_API_KEY')}"},
            timeout=30,
        ) as custom,
        httpx.Client(
            base_url=office_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as office,
    ):
        yield Crms(custom, office)


# -- the operator's view: the steps ---------------------------------------------------------------
def trip_the_breaker(demo: Demo, page: Page, crms: Crms, tmp_path: Path) -> int:
    """A bulk edit of most contacts' Title in Custom CRM: the sensor's run fails before
    writing, with the reason and the way out as its failure. Returns how many linked
    CRMOffice contacts would have changed."""
    from playwright.sync_api import expect

    with sensors_paused(demo):  # the whole bulk edit reaches one run
        since = time.time()
        contacts = crms.custom_all("contacts")
        for contact in contacts[: len(contacts) * 3 // 4 + 1]:  # well over half the links
            ok(crms.custom.patch(f"/contacts/{contact['Id']}", json={"Title": BULK_TITLE}))
    runs = wait_for_runs(demo, f"sync_{FLOW}", since)
    reasons = []
    for run in runs:  # each run since the edit stopped at the breaker
        status, _config, failures = run_events(demo, run["runId"])
        assert status == "FAILURE", (run, failures)
        assert any(step is None for step, _m in failures), failures  # the run's failure
        reasons += [message for step, message in failures if step == WRITES_STEP]
    assert reasons, f"no failure of {WRITES_STEP} in {runs}"
    for reason in reasons:
        assert "circuit breaker" in reason and "force: true" in reason, reason
    counted = re.search(r"circuit breaker: (\d+) of (\d+) linked records in CRMOffice", reasons[0])
    assert counted, reasons[0]
    touched, linked = int(counted[1]), int(counted[2])
    assert touched > linked / 2, reasons[0]

    # the run's log, filtered to the step that refused to write
    page.goto(f"{demo.url}/runs/{runs[0]['runId']}?logs=step:{WRITES_STEP}")
    expect(page.get_by_text("STEP_FAILURE", exact=True).first).to_be_visible()
    expect(page.get_by_text(f"circuit breaker: {touched} of {linked}").first).to_be_visible()
    expect(page.get_by_text("Failure", exact=True).first).to_be_visible()  # the run's status
    screenshot(page, tmp_path, "breaker.png")
    return touched


def force_from_the_launchpad(
    demo: Demo, page: Page, crms: Crms, tmp_path: Path, touched: int
) -> None:
    """The way out the breaker names: the job's launchpad, ``force: true`` on the
    reconciled step typed into the config editor, Launch Run; the run writes."""
    from playwright.sync_api import expect

    page.goto(f"{demo.url}/locations/crm_assets/jobs/sync_{FLOW}/playground")
    editor = page.locator(".CodeMirror").first
    # the launchpad scaffolds the job's default config first: replace all of it
    expect(editor).to_contain_text(f"{FLOW}__reconciled")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(FORCE_CONFIG)  # as a paste: the editor does not re-indent it
    expect(editor).to_contain_text("force: true")
    typed = editor.evaluate("element => element.CodeMirror.getValue()")
    assert typed.strip() == FORCE_CONFIG.strip(), typed
    expect(page.get_by_text("No errors", exact=True)).to_be_visible()
    launch = page.get_by_role("button", name="Launch Run")
    expect(launch).to_be_enabled()  # the config validated
    screenshot(page, tmp_path, "launchpad-force.png")

    launch.click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"), timeout=60_000)
    launched = re.search(r"/runs/([0-9a-f-]{36})", page.url)
    assert launched, page.url
    run_id = launched[1]
    assert wait_for_run(demo, run_id) == "SUCCESS", run_events(demo, run_id)
    _status, config, _failures = run_events(demo, run_id)
    assert "force: true" in config, config
    written = [c for c in crms.office_all("contacts") if c["title"] == BULK_TITLE]
    assert len(written) >= touched, f"{len(written)} of {touched} bulk-edited titles written"


def dead_letter_then_retry(demo: Demo, page: Page, crms: Crms, tmp_path: Path) -> None:
    """A product CRMOffice refuses waits as a dead letter (the run stays a success) and
    shows on ``dead_letters``; fixed in Custom CRM, ``crm-assets dead-letters retry``
    writes it."""
    from playwright.sync_api import expect

    since = time.time()
    product = ok(crms.custom.post("/products", json=DEAD_PRODUCT)).json()
    product_id = product["Id"]
    runs = wait_for_runs(demo, f"sync_{DEAD_FLOW}", since)  # the sensor's run
    assert all(run["status"] == "SUCCESS" for run in runs), runs
    tags = {t["key"]: t["value"] for t in runs[0]["tags"]}
    assert int(tags.get("crm_sync/dead_letters", "0")) >= 1, tags
    run_id, rows, _count = latest_records(demo, DEAD_FLOW, "dead_letters")
    assert run_id in {run["runId"] for run in runs}, (run_id, runs)
    letters = [row for row in rows if row["record"] == product_id]
    assert letters, rows
    assert REFUSAL in letters[0]["reason"] and letters[0]["written to"] == "CRMOffice", letters

    page.goto(f"{demo.url}/assets/{DEAD_FLOW}/dead_letters")
    expect(page.get_by_text(REFUSAL).first).to_be_visible()
    expect(page.get_by_text(letters[0]["id"]).first).to_be_visible()
    screenshot(page, tmp_path, "dead-letters.png")

    # the fix in its CRM, then the retry: sensors paused, so that the retry (not the
    # sensor's next run) is what writes it
    with sensors_paused(demo):
        fixed = {"ProductNumber": FIXED_PRODUCT_NUMBER}
        ok(crms.custom.patch(f"/products/{product_id}", json=fixed))
        retry = subprocess.run(
            [*demo_command(), "dead-letters", "retry", "--all", "--flow", DEAD_FLOW],
            env=demo.env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=OPERATOR_RUN_TIMEOUT,
        )
    output = f"exit {retry.returncode}\n{retry.stdout}\n{retry.stderr[-3000:]}"
    print(f"\ncrm-assets dead-letters retry: {output.strip()}")
    assert retry.returncode == 0, output
    cleared = re.search(r"retried (\d+) dead letter\(s\): (\d+) cleared", retry.stdout)
    assert cleared and cleared[1] == cleared[2] and int(cleared[1]) >= 1, output
    companies = [c for c in crms.office_all("companies") if c["name"] == DEAD_PRODUCT["Name"]]
    assert [c["orgNr"] for c in companies] == [str(FIXED_PRODUCT_NUMBER)], companies
    # the retry ran the flow in the demo's Dagster instance: the table is empty again
    _run_id, rows, count = latest_records(demo, DEAD_FLOW, "dead_letters")
    assert count == 0 and rows == [], rows


def conflict_on_both_sides(demo: Demo, page: Page, crms: Crms, tmp_path: Path) -> None:
    """The same field of one linked contact edited in both CRMs before a sync: the newer
    edit (CRMOffice's) wins, ``conflicts`` shows both values and the winner."""
    from playwright.sync_api import expect

    with sensors_paused(demo):  # both edits before the sync reads either
        since = time.time()
        office = crms.office_all("contacts")
        custom = crms.custom_all("contacts")
        emails = [c["email"] for c in office] + [c["Email"] for c in custom]
        by_email = {c["email"]: c for c in office if c["email"] and emails.count(c["email"]) == 2}
        # a contact linked by its e-mail (one on each side) and in agreement
        pairs = [
            (c, by_email[c["Email"]])
            for c in custom
            if c["Email"] in by_email and c["Title"] == by_email[c["Email"]]["title"]
        ]
        assert pairs, "no linked contact whose Title agrees in both CRMs"
        contact, twin = pairs[0]
        ok(crms.custom.patch(f"/contacts/{contact['Id']}", json={"Title": CUSTOM_TITLE}))
        time.sleep(CONFLICT_GAP)
        body = {k: v for k, v in twin.items() if k not in ("id", "createdAt", "updatedAt")}
        body.pop("rowVersion")
        ok(
            crms.office.put(
                f"/contacts/{twin['id']}",
                json={**body, "title": OFFICE_TITLE},
                headers={"If-Match": f'"{twin["rowVersion"]}"'},
            )
        )
    runs = wait_for_runs(demo, f"sync_{FLOW}", since)
    assert all(run["status"] == "SUCCESS" for run in runs), runs
    _run_id, rows, _count = latest_records(demo, FLOW, "conflicts")
    mine = [row for row in rows if row["Custom CRM id"] == contact["Id"]]
    assert mine, rows
    assert mine[0]["field"] == "Title -> title", mine
    assert mine[0]["Custom CRM value"] == CUSTOM_TITLE, mine
    assert mine[0]["CRMOffice value"] == OFFICE_TITLE, mine
    assert mine[0]["winner"] == "CRMOffice", mine
    # the winner's value in both CRMs
    assert ok(crms.custom.get(f"/contacts/{contact['Id']}")).json()["Title"] == OFFICE_TITLE

    page.goto(f"{demo.url}/assets/{FLOW}/conflicts")
    expect(page.get_by_text(CUSTOM_TITLE).first).to_be_visible()
    expect(page.get_by_text(OFFICE_TITLE).first).to_be_visible()
    # the table, not the status above it
    page.get_by_text("Metadata", exact=True).first.evaluate(
        "element => element.scrollIntoView({block: 'start'})"
    )
    screenshot(page, tmp_path, "conflicts.png")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_demo_shows_the_asset_graph_the_checks_and_the_operators_view_in_a_browser(
    demo: Demo, tmp_path: Path
):
    require_chromium()
    from playwright.sync_api import Locator, expect, sync_playwright

    with timed("demo up, first sync verified and settled"):
        wait_for_ui(demo)
        wait_for_verified(demo)
        wait_until_quiet(demo)
    started = demo.log_path.read_text(errors="replace")
    warned = [w for w in ("SupersessionWarning", "DeprecationWarning") if w in started]
    assert not warned, f"the demo printed {warned} while starting:\n{demo.log_tail()}"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)

            # Dagster's first-visit dialog ("Join the Dagster community") would cover the
            # page: mark it dismissed as its Skip button does, and click Skip should it show
            page.add_init_script(NUX_DISMISSED)

            def skip(button: Locator) -> None:
                button.click()

            page.add_locator_handler(page.get_by_role("button", name="Skip"), skip)

            # the flow's asset graph: every asset of the flow, by name
            page.goto(f"{demo.url}/locations/crm_assets/asset-groups/{FLOW}/lineage")
            for name in FLOW_ASSETS:
                expect(page.get_by_text(name, exact=True).first).to_be_visible()
            hide = page.get_by_text("Hide navigation", exact=True)
            if hide.is_visible():  # more room for the graph, so its nodes show their details
                hide.click()
                page.reload()
            expect(page.get_by_text("verified", exact=True).first).to_be_visible()
            expect(page.get_by_text("Materialized").first).to_be_visible()
            page.wait_for_timeout(1500)  # the graph's fit-to-screen animation
            expect(page.get_by_text("Join the Dagster community")).to_be_hidden()
            graph = tmp_path / "asset-graph.png"
            page.screenshot(path=str(graph))
            keep_screenshot(graph)

            # the checks of the verified asset, with their results
            page.goto(f"{demo.url}/assets/{'/'.join(VERIFIED)}?view=checks")
            for name in ("email_agrees", "title_agrees", "links_one_to_one", "no_failed_writes"):
                expect(page.get_by_text(name, exact=True).first).to_be_visible()
            expect(page.get_by_text("Succeeded", exact=True).first).to_be_visible()
            page.get_by_text("email_agrees", exact=True).first.click()
            expect(page.get_by_text("Evaluation result", exact=True)).to_be_visible()
            expect(page.get_by_text("Passed", exact=True).first).to_be_visible()
            expect(page.get_by_text("Email -> email").first).to_be_visible()
            page.wait_for_timeout(1000)
            expect(page.get_by_text("Join the Dagster community")).to_be_hidden()
            checks = tmp_path / "checks.png"
            page.screenshot(path=str(checks))
            keep_screenshot(checks)

            # the operator's view: a breaker trip and its way out, a dead letter and its
            # retry, a conflict (each step waits for the runs it causes)
            page.set_viewport_size(OPERATOR_VIEWPORT)
            with crm_clients(demo) as crms:
                with timed("breaker trip"):
                    touched = trip_the_breaker(demo, page, crms, tmp_path)
                with timed("forced from the launchpad"):
                    force_from_the_launchpad(demo, page, crms, tmp_path, touched)
                with timed("dead letter, then retried"):
                    dead_letter_then_retry(demo, page, crms, tmp_path)
                with timed("conflict"):
                    conflict_on_both_sides(demo, page, crms, tmp_path)
        finally:
            browser.close()
