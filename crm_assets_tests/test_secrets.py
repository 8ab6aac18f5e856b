"""Secrets (DESIGN section 8, last bullet): they come only from the environment and never show.

A sync run against services with distinctive random credentials (the Custom CRM
API key, the CRMOffice client secret, and the access tokens the sync obtained),
then every place a secret could leak is searched for them: captured logs and
output, the services' log files, the assets' materialization and check
metadata, the state database (audit, dead letters, every byte of the file),
the messages of authentication failures, the Dagster run's event log and every
file of the Dagster instance, and the Dagster UI's GraphQL answers (resources,
runs, run logs) plus its pages.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from embedded_fixtures import EmbeddedService, free_port
from test_convergence import figure_writer, out  # noqa: F401  (figure_writer: behind out)

from crm_assets.crm_office.client import CrmOfficeClient
from crm_assets.custom_crm.client import CustomCrmClient
from crm_assets.engine.state import SyncState
from crm_assets.headless import execute_sync
from crm_assets.http import CrmAuthError, RetryPolicy

UI_TIMEOUT = 90.0


class Haystack:
    """Named texts to search; every secret must be absent from every one."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def add(self, name: str, value: Any) -> None:
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        elif not isinstance(value, str):
            try:
                value = json.dumps(value, default=repr, ensure_ascii=False)
            except Exception:  # values json cannot walk (Dagster records): their repr
                value = repr(value)
        self.texts[name] = self.texts.get(name, "") + "\n" + value

    def add_files(self, name: str, root: Path) -> int:
        count = 0
        for path in sorted(root.rglob("*")):
            if path.is_file():
                self.add(f"{name}/{path.relative_to(root)}", path.read_bytes())
                count += 1
        return count

    def leaks(self, needles: dict[str, str]) -> list[str]:
        return [
            f"{secret} in {where}"
            for where, text in self.texts.items()
            for secret, needle in needles.items()
            if needle in text
        ]

    def size(self) -> int:
        return sum(len(t) for t in self.texts.values())


@pytest.fixture
def secret_world(
    embedded_service_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Any]]:
    """Both CRMs with distinctive random secrets, and the sync configured through the env."""
    api_key = f"ak-{secrets.token_hex(20)}"
    client_secret = f"cs-{secrets.token_hex(20)}"
    custom: EmbeddedService = embedded_service_factory(
        "custom-crm", credentials={"api_key": api_key}
    )
    office: EmbeddedService = embedded_service_factory(
        "crm-office",
        credentials={"client_id": f"client-{secrets.token_hex(4)}", "client_secret": client_secret},
    )
    data_dir, home = tmp_path / "sync", tmp_path / "dagster_home"
    home.mkdir()
    env = {
        "CUSTOM_CRM_BASE_URL": custom.base_url,
        "CUSTOM_CRM_API_KEY": api_key,
        "CRM_OFFICE_BASE_URL": office.base_url,
        "CRM_OFFICE_CLIENT_ID": office.credentials["client_id"],
        "CRM_OFFICE_CLIENT_SECRET": client_secret,
        "CRM_SYNC_DATA_DIR": str(data_dir),
        "CRM_SYNC_STATE_URL": f"sqlite:///{data_dir / 'state.db'}",
        "DAGSTER_HOME": str(home),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield {"custom": custom, "office": office, "env": env, "home": home, "data_dir": data_dir}


@contextlib.contextmanager
def dagster_ui(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """The Dagster UI over the project's definitions and the same instance, on a free port."""
    port = free_port()
    webserver = Path(sys.executable).with_name("dagster-webserver")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(webserver), "-m", "crm_assets.definitions", "-h", "127.0.0.1", "-p", str(port)],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + UI_TIMEOUT
        while True:
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the Dagster UI did not start"
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


REPOSITORIES = (
    "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"
)
RESOURCES = """
query ($selector: RepositorySelector!) {
  allTopLevelResourceDetailsOrError(repositorySelector: $selector) {
    __typename
    ... on ResourceDetailsList { results { name description
      configFields { name description configType { key } }
      configuredValues { key value type } } }
  }
}"""
RUNS = (
    "{ runsOrError { ... on Runs { results { runId status runConfigYaml tags { key value } } } } }"
)
LOGS = """
query ($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection { events { __typename
      ... on MessageEvent { message level }
      ... on MaterializationEvent { assetKey { path } metadataEntries { label description
        ... on TextMetadataEntry { text } ... on MarkdownMetadataEntry { mdStr }
        ... on IntMetadataEntry { intValue } } }
      ... on ExecutionStepFailureEvent { error { message stack } } } }
  }
}"""


def test_secrets_never_show(
    secret_world: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
):
    import logging

    caplog.set_level(logging.DEBUG)
    env = secret_world["env"]
    custom, office = secret_world["custom"], secret_world["office"]
    tokens: list[str] = []
    original = CrmOfficeClient._access_token

    def recording(self: CrmOfficeClient, stale: str | None = None) -> str:
        token = original(self, stale)
        if token not in tokens:
            tokens.append(token)
        return token

    monkeypatch.setattr(CrmOfficeClient, "_access_token", recording)

    with CustomCrmClient(custom.base_url, env["CUSTOM_CRM_API_KEY"]) as a:
        made = a.create("contacts", {"Email": "s@example.com", "FirstName": "Sec", "Title": "x"})
        a.create("products", {"Name": "Secret Co", "ProductNumber": 123})  # refused: orgNr
    first = execute_sync()
    with CustomCrmClient(custom.base_url, env["CUSTOM_CRM_API_KEY"]) as a:
        a.update("contacts", made["Id"], {"Title": "older"})
    creds = office.credentials
    with CrmOfficeClient(office.base_url, creds["client_id"], creds["client_secret"]) as b:
        (rec,) = [r for p in b.pages("contacts") for r in p]
        body = {k: v for k, v in rec.items() if k not in ("id", "createdAt", "updatedAt")}
        b.replace("contacts", rec["id"], {**body, "title": "newer"})  # a conflict, audited
    second = execute_sync()
    assert first.success and second.success, (first.failures, second.failures)
    assert tokens, "the sync obtained no CRMOffice token"

    # authentication failures: wrong secrets of the same shape, their messages
    wrong = {
        "wrong api key": f"ak-{secrets.token_hex(20)}",
        "wrong secret": f"cs-{secrets.token_hex(20)}",
    }
    auth_messages = []
    quick = RetryPolicy(attempts=1)
    bad_a = CustomCrmClient(custom.base_url, wrong["wrong api key"], retry=quick)
    with bad_a, pytest.raises(CrmAuthError) as caught:
        next(bad_a.pages("contacts"))
    auth_messages.append(str(caught.value))
    bad_b = CrmOfficeClient(office.base_url, "x", wrong["wrong secret"], retry=quick)
    with bad_b, pytest.raises(CrmAuthError) as caught:
        next(bad_b.pages("contacts"))
    auth_messages.append(str(caught.value))
    monkeypatch.setenv("CRM_OFFICE_CLIENT_SECRET", wrong["wrong secret"])
    monkeypatch.setenv("CUSTOM_CRM_API_KEY", wrong["wrong api key"])
    refused = execute_sync()
    monkeypatch.setenv("CRM_OFFICE_CLIENT_SECRET", env["CRM_OFFICE_CLIENT_SECRET"])
    monkeypatch.setenv("CUSTOM_CRM_API_KEY", env["CUSTOM_CRM_API_KEY"])
    assert not refused.success and refused.failures
    auth_messages += refused.failures

    hay = Haystack()
    hay.add("auth failure messages", auth_messages)
    for name, outcome in (("first", first), ("second", second), ("refused", refused)):
        hay.add(f"{name} run: materialization metadata", outcome.metadata)
        hay.add(f"{name} run: check metadata", outcome.checks)
        hay.add(f"{name} run: failures", outcome.failures)
    state = SyncState(env["CRM_SYNC_STATE_URL"])
    hay.add("state: audit", state.audit_log().to_dicts())
    hay.add("state: dead letters", state.dead_letters().to_dicts())
    assert state.dead_letters().height >= 1 and state.audit_log().height >= 1
    state.dispose()
    files = hay.add_files("sync data dir", secret_world["data_dir"])  # state.db bytes, plans
    hay.add("service log: Custom CRM", custom.log())
    hay.add("service log: CRMOffice", office.log())

    # the Dagster instance: the runs' event logs and every file it keeps
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert len(runs) >= 3
        events = 0
        for run in runs:
            hay.add(
                f"run {run.run_id}: config and tags", {"config": run.run_config, "tags": run.tags}
            )
            for entry in instance.all_logs(run.run_id):
                hay.add(f"run {run.run_id}: event log", repr(entry))
                events += 1
    files += hay.add_files("dagster home", secret_world["home"])

    # the Dagster UI: GraphQL answers and pages
    ui_answers = 0
    with dagster_ui(env, tmp_path / "webserver.log") as url:

        def graphql(query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
            nonlocal ui_answers
            response = httpx.post(
                f"{url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60
            )
            ui_answers += 1
            hay.add("UI GraphQL", response.text)
            body = response.json()
            assert "errors" not in body, body
            return dict(body["data"])

        repos = graphql(REPOSITORIES)["repositoriesOrError"]["nodes"]
        assert repos
        for repo in repos:
            selector = {
                "repositoryName": repo["name"],
                "repositoryLocationName": repo["location"]["name"],
            }
            details = graphql(RESOURCES, {"selector": selector})[
                "allTopLevelResourceDetailsOrError"
            ]
            assert details["__typename"] == "ResourceDetailsList", details
            shown = {r["name"] for r in details["results"]}
            assert {"custom_crm", "crm_office"} <= shown
        for run in graphql(RUNS)["runsOrError"]["results"]:
            graphql(LOGS, {"runId": run["runId"]})
        for page in (
            "/",
            "/assets",
            "/runs",
            "/deployment/locations",
            "/locations/crm_assets.definitions/resources",
        ):
            response = httpx.get(f"{url}{page}", timeout=30)
            hay.add(f"UI page {page}", response.text)
            ui_answers += 1
    hay.add("webserver log", (tmp_path / "webserver.log").read_text(errors="replace"))

    captured = capfd.readouterr()
    hay.add("captured output", captured.out + captured.err)
    hay.add(
        "captured log records",
        "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in caplog.records),
    )

    needles = {
        "CUSTOM_CRM_API_KEY": env["CUSTOM_CRM_API_KEY"],
        "CRM_OFFICE_CLIENT_SECRET": env["CRM_OFFICE_CLIENT_SECRET"],
        **{f"access token {i + 1}": t for i, t in enumerate(tokens)},
        **wrong,
    }
    leaks = hay.leaks(needles)
    out(
        f"\nsecrets: {len(needles)} secrets ({len(tokens)} access token(s) obtained by the sync, "
        f"2 configured, 2 wrong ones) searched in {len(hay.texts)} places, {hay.size():,} "
        f"characters: logs ({len(caplog.records)} records), service logs, metadata of "
        f"{len(first.metadata) + len(second.metadata)} materializations and "
        f"{len(first.checks) + len(second.checks)} checks, state database, {files} files, "
        f"{events} Dagster events, {ui_answers} UI answers; leaks: {len(leaks)}"
    )
    assert not leaks, leaks
