"""`make deploy-local`: the one-host deployment of docs/deploy.md, on this machine.

Starts, each as its own process with its output in ``<dir>/logs/<name>.log``:

- both embedded CRMs (``crm-assets serve custom-crm|crm-office``), seeded small;
- ``dagster code-server start`` for ``crm_assets.definitions`` (the sensors, and each run
  as a subprocess of it);
- ``dagster-daemon run`` (queue, sensor ticks, run monitoring, run retries);
- ``dagster-webserver`` (the UI and GraphQL),

with ``deploy/dagster.yaml`` in a fresh ``DAGSTER_HOME`` (``<dir>/dagster_home``), Dagster's
storage in the PostgreSQL database of ``DAGSTER_PG_URL`` (``postgresql+psycopg2://…``) and
the sync state in PostgreSQL too: ``CRM_SYNC_STATE_URL`` if set (its own database, or a
schema through ``?options=-csearch_path%3D…``), else the database ``<dagster db>_sync_state``
next to Dagster's, created when missing. Snapshots, plans and reports go to
``<dir>/data``. The webserver and the daemon get neither the CRM settings nor the state
URL (docs/deploy.md, "Variables per service"). SIGINT or SIGTERM stops everything; so does
any of the processes exiting (its log's tail is printed, exit code 1).

    DAGSTER_PG_URL=postgresql+psycopg2://user:pw@127.0.0.1:5432/dagster \\
        .venv/bin/python deploy/local.py --webserver-port 3000

Prints ``ready: …`` once the code location is loaded and the daemon is healthy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
LOCATION = "crm_assets"
STARTUP_TIMEOUT = 180.0
#: The daemons this instance needs before it does anything (deploy/dagster.yaml).
NEEDED_DAEMONS = {"SENSOR", "QUEUED_RUN_COORDINATOR", "MONITORING", "EVENT_LOG_CONSUMER"}

WORKSPACE_STATUS = """
query Workspace {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
  }
}
"""

DAEMON_HEALTH = """
query Daemons {
  instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } }
}
"""


class Refused(Exception):
    """A setting or a port this script will not start with; the message is one line."""


def log(message: str) -> None:
    print(f"deploy-local: {message}", flush=True)


# -- settings ---------------------------------------------------------------------------------
def dagster_url() -> sa.URL:
    raw = os.environ.get("DAGSTER_PG_URL", "")
    if not raw:
        raise Refused(
            "DAGSTER_PG_URL is not set: give the PostgreSQL database for Dagster's storage, "
            "e.g. postgresql+psycopg2://user:password@127.0.0.1:5432/dagster"
        )
    url = sa.make_url(raw)
    if url.drivername != "postgresql+psycopg2":
        raise Refused(
            f"DAGSTER_PG_URL must use the postgresql+psycopg2:// scheme, not {url.drivername}:// "
            "(dagster-postgres stores events through psycopg2; docs/deploy.md)"
        )
    return url


def state_url(dagster: sa.URL) -> tuple[sa.URL, bool]:
    """The sync state's URL, and whether it is the derived ``<db>_sync_state`` database."""
    raw = os.environ.get("CRM_SYNC_STATE_URL", "")
    if not raw:
        return dagster.set(database=f"{dagster.database}_sync_state"), True
    url = sa.make_url(raw)
    if url.get_backend_name() != "postgresql":
        raise Refused(f"CRM_SYNC_STATE_URL must be a PostgreSQL URL here, not {url.drivername}")
    same = (url.host, url.port, url.database) == (dagster.host, dagster.port, dagster.database)
    if same and "options" not in url.query:
        raise Refused(
            "CRM_SYNC_STATE_URL names Dagster's own database: give the sync state its own "
            "database, or a schema (?options=-csearch_path%3D<schema>)"
        )
    return url, False


def check_databases(dagster: sa.URL, state: sa.URL, create_state: bool) -> None:
    """Both databases answer; the derived state database is created when missing."""
    engine = sa.create_engine(
        dagster, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 10}
    )
    try:
        with engine.connect() as conn:
            if create_state:
                found = conn.execute(
                    sa.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                    {"name": state.database},
                ).first()
                if found is None:
                    conn.execute(sa.text(f'CREATE DATABASE "{state.database}"'))
                    log(f"created the sync state's database {state.database}")
    except sa.exc.DBAPIError as exc:
        raise Refused(f"DAGSTER_PG_URL: {str(exc.orig).strip()}") from None
    finally:
        engine.dispose()
    engine = sa.create_engine(state, connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.DBAPIError as exc:
        raise Refused(f"CRM_SYNC_STATE_URL: {str(exc.orig).strip()}") from None
    finally:
        engine.dispose()


def port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def connector_settings() -> set[str]:
    """Every connector's variable names (base URLs, accounts, secrets, rate limits)."""
    from crm_assets.connectors import CONNECTORS

    return {s.name for c in CONNECTORS for s in c.settings}


def script(name: str) -> str:
    """A console script of this environment (the venv's, next to its Python)."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise Refused(f"{name} is not installed (make install)")
    return found


# -- processes --------------------------------------------------------------------------------
@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class Deployment:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.logs = directory / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> Child:
        log_path = self.logs / f"{name}.log"
        with log_path.open("ab") as out:
            process = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stopped with all it started
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        log(f"started {name} (pid {process.pid}, log {log_path})")
        self.write_pids()
        return child

    def write_pids(self) -> None:
        pids = {c.name: c.process.pid for c in self.children}
        (self.dir / "pids.json").write_text(json.dumps(pids, indent=2) + "\n")

    def check_alive(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise ChildExited(child, code)

    def wait_until(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError, OSError):
                if ready():
                    return
            time.sleep(0.5)
        raise Refused(f"{what} not ready within {timeout:.0f} s")

    def stop_all(self) -> None:
        for child in reversed(self.children):
            stop(child)


class ChildExited(Exception):
    def __init__(self, child: Child, code: int) -> None:
        super().__init__(f"{child.name} exited with code {code}")
        self.child = child


def stop(child: Child, timeout: float = 20.0) -> None:
    """SIGTERM to the child's process group, SIGKILL after ``timeout``."""
    process = child.process
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"{child.name} still running {timeout:.0f} s after SIGTERM: SIGKILL")
    # whatever it left behind in its group (run processes of the code server, say)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    log(f"stopped {child.name} (exit code {process.returncode})")


def graphql(base: str, query: str) -> dict[str, Any]:
    response = httpx.post(f"{base}/graphql", json={"query": query}, timeout=10)
    response.raise_for_status()
    body = response.json()
    if "errors" in body:
        raise httpx.HTTPError(str(body["errors"])[:300])
    return dict(body["data"])


def location_loaded(base: str) -> bool:
    data = graphql(base, WORKSPACE_STATUS)["workspaceOrError"]
    for entry in data.get("locationEntries", []):
        if entry["name"] != LOCATION or entry["loadStatus"] != "LOADED":
            continue
        loaded = entry["locationOrLoadError"] or {}
        if loaded.get("__typename") == "PythonError":
            raise Refused(f"the code location failed to load: {loaded['message'].strip()}")
        return loaded.get("__typename") == "RepositoryLocation"
    return False


def daemons_healthy(base: str) -> bool:
    statuses = graphql(base, DAEMON_HEALTH)["instance"]["daemonHealth"]["allDaemonStatuses"]
    healthy = {s["daemonType"] for s in statuses if s["healthy"]}
    return healthy >= NEEDED_DAEMONS


# -- the deployment ---------------------------------------------------------------------------
def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir",
        type=Path,
        help="folder for Dagster's home, data and logs "
        "(default: a new temporary folder; must be empty or new)",
    )
    parser.add_argument("--seed", type=int, default=20, help="demo contacts per CRM (20)")
    parser.add_argument("--host", default="127.0.0.1", help="the webserver's address")
    parser.add_argument("--webserver-port", type=int, default=3000)
    parser.add_argument("--code-server-port", type=int, default=4000)
    parser.add_argument("--custom-crm-port", type=int, default=8101)
    parser.add_argument("--crm-office-port", type=int, default=8102)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored
        signal.signal(signum, _interrupt)
    started: list[Deployment] = []
    try:
        return run(args, started)
    except Refused as exc:
        print(f"deploy-local: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except ChildExited as exc:
        print(f"deploy-local: error: {exc}; its log ends:\n{exc.child.tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C: stop anyway
            signal.signal(signum, signal.SIG_IGN)
        for deployment in started:
            log("stopping")
            deployment.stop_all()


def run(args: argparse.Namespace, started: list[Deployment]) -> int:
    t0 = time.monotonic()
    ports = {
        "the webserver (--webserver-port)": args.webserver_port,
        "the code server (--code-server-port)": args.code_server_port,
        "Custom CRM (--custom-crm-port)": args.custom_crm_port,
        "CRMOffice (--crm-office-port)": args.crm_office_port,
    }
    taken = [f"{what} on port {p}" for what, p in ports.items() if port_taken(p)]
    if taken:
        raise Refused(f"port already in use: {', '.join(taken)}")
    dagster = dagster_url()
    state, derived = state_url(dagster)
    check_databases(dagster, state, derived)

    directory = args.dir or Path(tempfile.mkdtemp(prefix="crm-deploy-local."))
    directory = directory.resolve()
    if directory.exists() and any(directory.iterdir()):
        raise Refused(f"{directory} is not empty: give a new or empty --dir")
    home = directory / "dagster_home"
    home.mkdir(parents=True)
    shutil.copyfile(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    workspace = yaml.safe_load((DEPLOY / "workspace.yaml").read_text())
    server = workspace["load_from"][0]["grpc_server"]
    server.update(host="127.0.0.1", port=args.code_server_port)
    (home / "workspace.yaml").write_text(yaml.safe_dump(workspace, sort_keys=False))
    data_dir = directory / "data"
    data_dir.mkdir()
    log(f"folder {directory} (DAGSTER_HOME {home}, data {data_dir})")
    log(f"Dagster's storage: {dagster.render_as_string()}; sync state: {state.render_as_string()}")

    custom_url = f"http://127.0.0.1:{args.custom_crm_port}"
    office_url = f"http://127.0.0.1:{args.crm_office_port}"
    base = dict(os.environ)
    base.update(DAGSTER_HOME=str(home), DAGSTER_PG_URL=dagster.render_as_string(False))
    base.setdefault("PYTHONUNBUFFERED", "1")
    # the code server and its runs: the CRMs, the sync state, the sync's own settings
    code_env = dict(base)
    code_env.update(
        CUSTOM_CRM_BASE_URL=custom_url,
        CRM_OFFICE_BASE_URL=office_url,
        CRM_SYNC_STATE_URL=state.render_as_string(False),
        CRM_SYNC_DATA_DIR=str(data_dir),
    )
    # a retry that starts right after a crash waits out the dead run's lease (deploy/dagster.yaml)
    code_env.setdefault("CRM_SYNC_LEASE_TTL", "60")
    code_env.setdefault("CRM_SYNC_LEASE_WAIT", "90")
    # the webserver and the daemon run no project code: no CRM settings, no state URL
    private = connector_settings()
    ui_env = {k: v for k, v in base.items() if k not in private and not k.startswith("CRM_SYNC_")}

    # the CRMs: their own credentials (the demo defaults unless set), nothing of Dagster's
    crm_env = {k: v for k, v in base.items() if not k.startswith(("DAGSTER_", "CRM_SYNC_"))}

    deployment = Deployment(directory)
    started.append(deployment)
    services = (("custom-crm", args.custom_crm_port), ("crm-office", args.crm_office_port))
    for system, port in services:
        data = directory / "services" / system
        cmd = [sys.executable, "-m", "crm_assets.cli", "serve", system, "--port", str(port)]
        cmd += ["--data", str(data), "--seed", str(args.seed)]
        deployment.start(system, cmd, crm_env)
    # meanwhile Dagster's tables, created once before three processes would race to
    migrate_log = deployment.logs / "migrate.log"
    with migrate_log.open("wb") as out:
        migrate = subprocess.Popen(
            [script("dagster"), "instance", "migrate"],
            env=ui_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        for system, port in services:
            url = f"http://127.0.0.1:{port}/openapi.json"
            deployment.wait_until(system, lambda u=url: httpx.get(u, timeout=2).is_success, 60)
        code = migrate.wait(timeout=STARTUP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise Refused(
            f"dagster instance migrate did not finish in {STARTUP_TIMEOUT:.0f} s"
        ) from None
    finally:
        if migrate.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(migrate.pid, signal.SIGKILL)
            migrate.wait()
    if code != 0:
        tail = migrate_log.read_text(errors="replace")[-3000:]
        raise Refused(f"dagster instance migrate failed (exit code {code}):\n{tail}")
    log(f"Dagster's storage is ready ({time.monotonic() - t0:.1f} s)")

    deployment.start(
        "code-server",
        [
            *(script("dagster"), "code-server", "start", "-h", "127.0.0.1"),
            *("-p", str(args.code_server_port), "-m", "crm_assets.definitions"),
            *("--location-name", LOCATION),
        ],
        code_env,
    )
    deployment.wait_until(
        "the code server", lambda: port_taken(args.code_server_port), STARTUP_TIMEOUT
    )
    log(f"code server on 127.0.0.1:{args.code_server_port} ({time.monotonic() - t0:.1f} s)")
    ws = str(home / "workspace.yaml")
    deployment.start("daemon", [script("dagster-daemon"), "run", "-w", ws], ui_env)
    deployment.start(
        "webserver",
        [script("dagster-webserver"), "-h", args.host, "-p", str(args.webserver_port), "-w", ws],
        ui_env,
    )
    local = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    ui = f"http://{local}:{args.webserver_port}"
    deployment.wait_until(
        "the webserver",
        lambda: httpx.get(f"{ui}/server_info", timeout=2).is_success,
        STARTUP_TIMEOUT,
    )
    deployment.wait_until("the code location", lambda: location_loaded(ui), STARTUP_TIMEOUT)
    deployment.wait_until("the daemon", lambda: daemons_healthy(ui), STARTUP_TIMEOUT)
    shown = f"http://{args.host}:{args.webserver_port}"
    log(
        f"ready: Dagster UI on {shown}, Custom CRM on {custom_url}, CRMOffice on {office_url} "
        f"({time.monotonic() - t0:.1f} s; Ctrl-C stops everything)"
    )
    while True:  # until a signal, or one of them exits (ChildExited)
        deployment.check_alive()
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
