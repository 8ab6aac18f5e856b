"""The demo: every embedded CRM (so whichever the selected documents name), seeded, plus
the Dagster UI.

Each service listens where its connector's base URL setting (``CUSTOM_CRM_BASE_URL``,
``CRM_OFFICE_BASE_URL``, ...) points, so the Dagster resources (which read the
same variables) reach them.
Everything stops together on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from crm_assets.connectors import CONNECTORS
from crm_assets.settings import Settings
from crm_assets.settings import env as configured


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Block until ``url`` answers over HTTP; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with code {process.returncode}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def start_service(system: str, base_url: str, data_dir: Path, seed: int) -> subprocess.Popen[bytes]:
    """Start one embedded CRM as a child process, seeded, and wait until it answers."""
    port = urlsplit(base_url).port
    if port is None:
        raise ValueError(f"base URL {base_url!r} has no port")
    cmd = [sys.executable, "-m", "crm_assets.cli", "serve", system, "--port", str(port)]
    cmd += ["--data", str(data_dir / "services" / system), "--seed", str(seed)]
    process = subprocess.Popen(cmd, start_new_session=True)
    wait_until_up(f"{base_url}/openapi.json", process)
    return process


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop a child and everything it started (its own session), politely first."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


#: The demo's Dagster instance: runs of different flows side by side, runs of one flow
#: queued (the run tag per flow, and each flow's pool of steps); the flow's lease in
#: the state database keeps one writer per flow whatever an instance says.
DAGSTER_YAML = """\
# written by `crm-assets demo` on every start
run_launcher:  # each run forked from a process that loaded Dagster and the project once
  module: crm_assets.defs.launcher
  class: WarmRunLauncher
run_coordinator:  # the queue is read every second (default 5): a queued sync starts sooner
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
concurrency:
  runs:
    max_concurrent_runs: 4
    tag_concurrency_limits:
      - key: crm_sync/flow
        value:
          applyLimitPerUniqueValue: true
        limit: 1
  pools:
    default_limit: 1
telemetry:
  enabled: false
"""

WORKSPACE_YAML = """\
load_from:
  - python_module:
      module_name: crm_assets.definitions
      location_name: crm_assets
"""


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def port_taken(port: int) -> bool:
    """Whether something already listens on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def run_demo(seed: int, port: int) -> int:
    """Run the demo until interrupted; returns the Dagster UI's exit code."""
    wanted = {"the Dagster UI (--port)": port}
    for connector in CONNECTORS:
        setting = connector.setting("base_url")
        if setting is not None:
            wanted[f"{connector.system} ({setting.name})"] = (
                urlsplit(configured(setting.name)).port or 0
            )
    taken = [f"{what} on port {p}" for what, p in wanted.items() if p and port_taken(p)]
    if taken:  # refuse before starting anything (another demo may be running)
        print(
            f"error: port already in use: {', '.join(taken)}; stop the other demo or choose "
            "other ports",
            file=sys.stderr,
        )
        return 2
    settings = Settings.from_env()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # resolved once: every child (services, webserver, daemon, runs) uses the same folder
    env["CRM_SYNC_DATA_DIR"] = str(settings.data_dir)
    print(f"data directory: {settings.data_dir}", flush=True)
    home = Path(env.setdefault("DAGSTER_HOME", str(settings.data_dir / "dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    workspace = settings.data_dir / "workspace.yaml"
    workspace.write_text(WORKSPACE_YAML)
    children: list[subprocess.Popen[bytes]] = []
    for signum in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored
        signal.signal(signum, _interrupt)
    try:
        for connector in CONNECTORS:
            url = configured(connector.setting("base_url").name)  # type: ignore[union-attr]
            children.append(start_service(connector.slug, url, settings.data_dir, seed))
        ui = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("dg")),
                "dev",
                "-w",
                str(workspace),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            env=env,
            start_new_session=True,
        )
        children.append(ui)
        print(f"Dagster UI on http://127.0.0.1:{port} (Ctrl-C stops the demo)", flush=True)
        return ui.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for child in reversed(children):
            stop(child)
