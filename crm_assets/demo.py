"""The demo: both embedded CRMs, seeded, plus the Dagster UI, in one command.

The services listen where ``CUSTOM_CRM_BASE_URL`` and ``CRM_OFFICE_BASE_URL``
point, so the Dagster resources (which read the same variables) reach them.
Everything stops together on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from crm_assets.settings import Settings


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


#: The demo's Dagster instance: one sync run at a time, so two runs never write the same records.
DAGSTER_YAML = """\
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: 1
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


def run_demo(seed: int, port: int) -> int:
    """Run the demo until interrupted; returns the Dagster UI's exit code."""
    settings = Settings.from_env()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    home = Path(env.setdefault("DAGSTER_HOME", str(settings.data_dir / "dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text(DAGSTER_YAML)
    workspace = settings.data_dir / "workspace.yaml"
    workspace.write_text(WORKSPACE_YAML)
    children: list[subprocess.Popen[bytes]] = []
    for signum in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored
        signal.signal(signum, _interrupt)
    try:
        for system, url in (
            ("custom-crm", settings.custom_crm_base_url),
            ("crm-office", settings.crm_office_base_url),
        ):
            children.append(start_service(system, url, settings.data_dir, seed))
        ui = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dagster",
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
