"""The demo as a user sees it: the Dagster UI in a real (headless) Chromium.

Starts ``crm-assets demo`` (both embedded CRMs, seeded, and the Dagster UI) on free
ports, waits until the change sensors' first runs have verified the contact flow,
then opens the asset graph and the checks of ``contact_to_contacts/verified`` in
Debian's Chromium, driven by Playwright (never ``playwright install``: no browser
download). Screenshots go to ``tmp_path``; with ``UPDATE_SCREENSHOTS=1`` also to
``docs/screenshots/`` (the README shows them).

Chromium missing: skipped on a developer's machine, failed in CI (``CI=true``),
where ``.ci/run`` installs it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from embedded_fixtures import free_port

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

UI_TIMEOUT = 90.0
RUN_TIMEOUT = 120.0
#: Launch ``sync_all`` ourselves if the sensors have not verified the flow by then.
SENSOR_GRACE = 45.0
#: No run queued or running for this long (more than a sensor interval): the demo settled.
QUIET = 7.0
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

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def graphql(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        response = httpx.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=30
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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRM_", "CUSTOM_CRM_"))}
    env.update(
        CUSTOM_CRM_BASE_URL=f"http://127.0.0.1:{free_port()}",
        CRM_OFFICE_BASE_URL=f"http://127.0.0.1:{free_port()}",
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
        yield Demo(process, f"http://127.0.0.1:{port}", log_path)
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


def launch_sync_all(demo: Demo) -> None:
    params = {
        "selector": {
            "repositoryLocationName": "crm_assets",
            "repositoryName": "__repository__",
            "jobName": "sync_all",
        },
        "runConfigData": {},
    }
    result = demo.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result


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


def wait_until_quiet(demo: Demo) -> None:
    """Until no run is queued or running for a while, so the UI shows settled results
    (echo runs of the sync's own writes die out after a round or two)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    quiet_since = None
    while time.monotonic() < deadline:
        demo.check_alive()
        runs = demo.graphql(ACTIVE_RUNS, {})["runsOrError"]
        if runs["__typename"] == "Runs" and not runs["results"]:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= QUIET:
                return
        else:
            quiet_since = None
        time.sleep(1)
    # still busy: go on, the assertions below say what is not shown


def keep_screenshot(path: Path) -> None:
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / path.name)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_demo_shows_the_asset_graph_and_the_checks_in_a_browser(demo: Demo, tmp_path: Path):
    require_chromium()
    from playwright.sync_api import Locator, expect, sync_playwright

    wait_for_ui(demo)
    wait_for_verified(demo)
    wait_until_quiet(demo)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(30_000)
            expect.set_options(timeout=30_000)

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
        finally:
            browser.close()
