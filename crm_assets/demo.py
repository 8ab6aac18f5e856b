"""The demo: both embedded CRMs, seeded, plus the Dagster UI, in one command.

The services listen where ``CUSTOM_CRM_BASE_URL`` and ``CRM_OFFICE_BASE_URL``
point, so the Dagster resources (which read the same variables) reach them.
Everything stops together on Ctrl-C.
"""

from __future__ import annotations

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
    process = subprocess.Popen(cmd)
    wait_until_up(f"{base_url}/openapi.json", process)
    return process


def run_demo(seed: int, port: int) -> int:
    """Run the demo until interrupted; returns the Dagster UI's exit code."""
    settings = Settings.from_env()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("DAGSTER_HOME", str(settings.data_dir / "dagster_home"))
    Path(env["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    children: list[subprocess.Popen[bytes]] = []
    try:
        children.append(
            start_service("custom-crm", settings.custom_crm_base_url, settings.data_dir, seed)
        )
        children.append(
            start_service("crm-office", settings.crm_office_base_url, settings.data_dir, seed)
        )
        ui = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dagster",
                "dev",
                "-m",
                "crm_assets.definitions",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            env=env,
        )
        children.append(ui)
        print(f"Dagster UI on http://127.0.0.1:{port} (Ctrl-C stops the demo)", flush=True)
        return ui.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        for child in reversed(children):
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
