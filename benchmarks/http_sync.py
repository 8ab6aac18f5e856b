"""Initial sync over HTTP against both embedded services under a rate limit.

Counts the requests each service answered from its access log, so the time the
rate limit alone imposes is computed from the requests the sync really needed.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from crm_assets.crm_office.client import BATCH_SIZE, CrmOfficeClient
from crm_assets.custom_crm.client import CustomCrmClient
from crm_assets.engine.document import read_document
from crm_assets.engine.snapshot import SnapshotStore
from crm_assets.engine.state import SyncState
from crm_assets.settings import packaged_spec_path
from crm_assets.sync import flow_mappings, sync_once

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "crm_assets_tests"))
from embedded_fixtures import start_service

REQUEST = re.compile(r'"(GET|POST|PUT|PATCH|DELETE) (\S+) HTTP/1.1" (\d{3})')


def requests_in(log: Path) -> list[tuple[str, str, int]]:
    """(method, path, status) of every request a service logged."""
    return [(m[1], m[2], int(m[3])) for m in REQUEST.finditer(log.read_text(errors="replace"))]


def measure_http(contacts: int, products: int, rate_limit: float) -> dict[str, Any]:
    """One initial sync of seeded services; ``products`` follows from the seed (N // 10)."""
    work = Path(tempfile.mkdtemp(prefix="crm-bench-"))
    custom = start_service("custom-crm", work / "custom", seed=contacts, rate_limit=rate_limit)
    office = start_service("crm-office", work / "office", seed=contacts, rate_limit=rate_limit)
    try:
        before = {s.system: len(requests_in(s.log_path)) for s in (custom, office)}
        clients = {
            "custom_crm": CustomCrmClient(
                custom.base_url, custom.credentials["api_key"], rate_limit=rate_limit
            ),
            "crm_office": CrmOfficeClient(
                office.base_url, **office.credentials, rate_limit=rate_limit
            ),
        }
        mappings = flow_mappings(read_document(packaged_spec_path()))
        started = time.perf_counter()
        runs = sync_once(
            mappings,
            clients,
            SnapshotStore(work / "snapshots"),
            SyncState(f"sqlite:///{work}/state.db"),
        )
        seconds = time.perf_counter() - started
        logged = {s.system: requests_in(s.log_path)[before[s.system] :] for s in (custom, office)}
    finally:
        custom.stop()
        office.stop()
    needed = {k: [r for r in v if r[2] != 429] for k, v in logged.items()}
    batch_calls = sum(1 for r in needed["crm-office"] if r[0] == "POST" and r[1].endswith("/batch"))
    records = sum(len(r.plan.pairs) for r in runs.values()) + sum(
        len(c) for r in runs.values() for c in r.plan.creates.values()
    )
    written = sum(res.created + res.updated for r in runs.values() for res in r.results.values())
    return {
        "contacts": contacts,
        "products": max(1, contacts // 10),
        "rate_limit": rate_limit,
        "seconds": seconds,
        "requests_custom_crm": len(needed["custom-crm"]),
        "requests_crm_office": len(needed["crm-office"]),
        "throttled": {k: len(v) - len(needed[k]) for k, v in logged.items()},
        "rate_limit_seconds": max(len(v) for v in needed.values()) / rate_limit,
        "requests_per_record": (len(needed["custom-crm"]) + len(needed["crm-office"]))
        / max(1, 2 * contacts),
        "full_batch_share": _full_batches(runs),
        "batch_calls": batch_calls,
        "records_planned": records,
        "records_written": written,
    }


def _full_batches(runs: dict[str, Any]) -> float:
    """Share of CRMOffice batch calls that carried a full batch (the last of each kind may not)."""
    calls = full = 0
    for run in runs.values():
        for size in (len(run.plan.creates["b"]), int(run.plan.pairs.get_column("write_b").sum())):
            whole, rest = divmod(size, BATCH_SIZE)
            calls += whole + (1 if rest else 0)
            full += whole
    return full / calls if calls else 1.0
