"""Faults and crashes (DESIGN section 8, second bullet), over HTTP against the embedded CRMs.

- Injected faults (5xx before the work, 5xx after it, dropped connections, 429
  bursts, latency, failing batch items): the sync converges within a bounded
  number of runs, with no duplicates and nothing lost.
- ``crm-assets sync`` killed with SIGKILL at random moments of its writes, 20
  times and more: the next runs converge, with no duplicates and nothing lost.

"Nothing lost, no duplicates" is checked against what the test itself wrote:
every record made on either side exists exactly once on both sides (by its merge
key), with every value it was given (or edited to), and references pointing at
the counterpart of the record they pointed at.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import SyncWorld
from memory_crm import Fault, MemoryCrmOffice, MemoryCustomCrm, SimClock
from test_convergence import figure_writer, out  # noqa: F401  (figure_writer: behind out)

from crm_assets.engine.document import read_document
from crm_assets.engine.snapshot import SnapshotStore
from crm_assets.engine.state import SyncState
from crm_assets.headless import SyncOutcome, execute_sync
from crm_assets.settings import packaged_spec_path
from crm_assets.sync import flow_mappings, sync_once, take_snapshot, verify_flow

MAPPINGS = flow_mappings(read_document(packaged_spec_path()))
CRM_ASSETS = str(Path(sys.executable).parent / "crm-assets")


# -- what the test wrote, and the check that both CRMs hold exactly that ----------------------
CONTACT_FIELDS = {  # canonical name -> (Custom CRM field, CRMOffice field)
    "email": ("Email", "email"),
    "givenName": ("FirstName", "givenName"),
    "familyName": ("LastName", "familyName"),
    "title": ("Title", "title"),
    "mobilePhone": ("MobilePhone", "mobilePhone"),
}
PRODUCT_FIELDS = {
    "name": ("Name", "name"),
    "orgNr": ("ProductNumber", "orgNr"),
    "website": ("Url", "website"),
    "city": ("City", "visitAddress.postalArea"),
}


def _get(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _canon(value: Any) -> Any:
    return None if value is None or str(value).strip() == "" else str(value)


@dataclass
class Expected:
    """Every entity the test made, by merge key, with the values it must have on both sides."""

    products: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> values
    contacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # email -> values + company
    lost_conflicts: int = 0  # values that lost a conflict to a newer record (audited)

    def records(self) -> int:
        return len(self.products) + len(self.contacts)


class Population:
    """Makes records on both CRMs with unique merge keys, some pairs meant to merge."""

    def __init__(self, world: SyncWorld, rng: random.Random) -> None:
        self.world, self.rng = world, rng
        self.expected = Expected()
        self.n = 0

    def _next(self) -> int:
        self.n += 1
        return self.n

    def add(self, products: int, contacts: int, merged: int = 1) -> None:
        """``products``/``contacts`` per side; ``merged`` of each exist on both sides."""
        with self.world.custom_client() as a, self.world.office_client() as b:
            names: list[tuple[str, str | None, str | None]] = []  # name, a id, b id
            for side in ("a", "b"):
                for i in range(products):
                    k = self._next()
                    name = f"Firma {k} {'Æ' if k % 3 else '🙂'}"
                    values = {"name": name, "orgNr": str(900_000_000 + k)}
                    values["website" if side == "a" else "city"] = f"w{k}.example"
                    made = self._product(a, b, side, values)
                    names.append(
                        (name, made if side == "a" else None, made if side == "b" else None)
                    )
                    if i < merged:  # the same company on the other side, other fields filled
                        other_side = "b" if side == "a" else "a"
                        extra = {"name": name, ("city" if side == "a" else "website"): f"m{k}"}
                        self._product(a, b, other_side, extra)
                        values = {**values, **extra}
                    self.expected.products[name] = values
            a_products = [(n, i) for n, i, _ in names if i]
            b_companies = [(n, i) for n, _, i in names if i]
            for side in ("a", "b"):
                pool = a_products if side == "a" else b_companies
                for i in range(contacts):
                    k = self._next()
                    email = f"person{k}@example.com"
                    values: dict[str, Any] = {"email": email, "givenName": f"Given {k}"}
                    values["title" if side == "a" else "familyName"] = f"T{k} <b>ø</b>"
                    company = self.rng.choice(pool) if pool and k % 2 else None
                    self._contact(a, b, side, values, company[1] if company else None)
                    if i < merged:
                        other_side = "b" if side == "a" else "a"
                        extra = {"email": email.upper(), "mobilePhone": f"+47 {k}"}
                        self._contact(a, b, other_side, extra, None)
                        extra["email"] = email
                        values = {**values, **extra}
                    values["company"] = company[0] if company else None
                    self.expected.contacts[email] = values

    def _product(self, a: Any, b: Any, side: str, values: dict[str, Any]) -> str:
        if side == "a":
            body = {PRODUCT_FIELDS[k][0]: v for k, v in values.items()}
            if "ProductNumber" in body:
                body["ProductNumber"] = int(body["ProductNumber"])
            return str(a.create("products", body)["Id"])
        body = {k: v for k, v in values.items() if k != "city"}
        if "city" in values:
            body["visitAddress"] = {"postalArea": values["city"]}
        return str(b.create("companies", body)["id"])

    def _contact(
        self, a: Any, b: Any, side: str, values: dict[str, Any], company: str | None
    ) -> str:
        if side == "a":
            body = {CONTACT_FIELDS[k][0]: v for k, v in values.items()}
            body["ProductId"] = company
            return str(a.create("contacts", body)["Id"])
        body = dict(values)
        body["company"] = {"id": company} if company else None
        return str(b.create("contacts", body)["id"])

    def edit_some(self, count: int) -> int:
        """Edit ``count`` contacts on random sides (one field each); the expectation follows."""
        edits = 0
        with self.world.custom_client() as a, self.world.office_client() as b:
            by_email_a = {_canon(r["Email"]).lower(): r for r in _all(a, "contacts")}  # type: ignore[union-attr]
            by_email_b = {_canon(r["email"]).lower(): r for r in _all(b, "contacts")}  # type: ignore[union-attr]
            emails = sorted(set(by_email_a) & set(by_email_b) & set(self.expected.contacts))
            for email in self.rng.sample(emails, min(count, len(emails))):
                k = self._next()
                name = self.rng.choice(("title", "mobilePhone", "familyName"))
                value = f"edited {k}"
                if self.rng.random() < 0.5:
                    rec = by_email_a[email]
                    a.update("contacts", rec["Id"], {CONTACT_FIELDS[name][0]: value})
                else:
                    rec = by_email_b[email]
                    body = {
                        k2: v
                        for k2, v in rec.items()
                        if k2 not in ("id", "createdAt", "updatedAt", "rowVersion")
                    }
                    body[CONTACT_FIELDS[name][1]] = value
                    b.replace("contacts", rec["id"], body)
                self.expected.contacts[email][name] = value
                edits += 1
        return edits


def _all(client: Any, obj: str) -> list[dict[str, Any]]:
    return [r for page in client.pages(obj) for r in page if not r.get("Deleted")]


@dataclass
class Check:
    records: int = 0
    values: int = 0
    duplicates: int = 0
    losses: int = 0
    conflicts: int = 0  # expected values that lost a conflict, as the audit log says
    problems: list[str] = field(default_factory=list)


def lost_conflicts(world: SyncWorld) -> dict[tuple[str, str, str], tuple[str | None, str | None]]:
    """(side, record id, field) -> (losing value, winning value) of every audited conflict."""
    import polars as pl

    audit = world.state().audit_log().filter(pl.col("kind") == "conflict")
    found: dict[tuple[str, str, str], tuple[str | None, str | None]] = {}
    for r in audit.iter_rows(named=True):
        for side in ("a", "b"):
            found[(side, r[f"{side}_id"], r["field"])] = (r["old_value"], r["new_value"])
    return found


def check_world(world: SyncWorld, expected: Expected) -> Check:
    """Both CRMs hold every expected entity exactly once with all its values: the value it
    was given or edited to, unless that value lost a conflict (by the design's rule, the newer
    record wins) and the audit log keeps it as the losing value."""
    result = Check()
    conflicts = lost_conflicts(world)
    with world.custom_client() as a, world.office_client() as b:
        sides = {
            "a": {"products": _all(a, "products"), "contacts": _all(a, "contacts")},
            "b": {"products": _all(b, "companies"), "contacts": _all(b, "contacts")},
        }
    for side, col in (("a", 0), ("b", 1)):
        product_names = {
            r["Id" if side == "a" else "id"]: r["Name" if side == "a" else "name"]
            for r in sides[side]["products"]
        }
        for kind, fields, expect in (
            ("products", PRODUCT_FIELDS, expected.products),
            ("contacts", CONTACT_FIELDS, expected.contacts),
        ):
            key_field = fields["name" if kind == "products" else "email"][col]
            groups: dict[str, list[dict[str, Any]]] = {}
            for r in sides[side][kind]:
                key = str(_canon(r.get(key_field)) or "").strip()
                groups.setdefault(key.lower() if kind == "contacts" else key, []).append(r)
            for key, rows in groups.items():
                if len(rows) > 1:
                    result.duplicates += len(rows) - 1
                    result.problems.append(f"{side} {kind} {key!r} exists {len(rows)} times")
                if key not in expect:
                    result.problems.append(f"{side} {kind} {key!r} was never made")
            for key, values in expect.items():
                rows = groups.get(key, [])
                if not rows:
                    result.losses += 1
                    result.problems.append(f"{side} {kind} {key!r} missing")
                    continue
                result.records += 1
                record = rows[0]
                for name, want in values.items():
                    if name == "company":
                        ref = (
                            record.get("ProductId")
                            if side == "a"
                            else (record.get("company") or {}).get("id")
                        )
                        got = product_names.get(ref) if ref else None
                    elif name == "email":
                        got = str(_canon(record.get(fields[name][col])) or "").strip().lower()
                    else:
                        got = _canon(_get(record, fields[name][col]))
                    result.values += 1
                    rid = str(record["Id" if side == "a" else "id"])
                    column = "visitAddress.postalArea" if name == "city" else name
                    lost = conflicts.get((side, rid, column))
                    if got != _canon(want) and lost == (_canon(want), got):
                        # the value lost a conflict to a newer record and the audit says so
                        result.conflicts += 1
                        expected.lost_conflicts += 1
                        values[name] = got  # what is expected from now on
                        continue
                    if got != _canon(want):
                        result.losses += 1
                        result.problems.append(
                            f"{side} {kind} {key!r} {name}: {got!r}, expected {want!r}"
                        )
    return result


def explain(world: SyncWorld, check: Check) -> str:
    """On a failure: the problems, with both records and the audit trail of each pair."""
    import re

    import polars as pl

    lines = list(check.problems)
    emails = set(re.findall(r"'([^']+@example\.com)'", " ".join(check.problems)))
    with world.custom_client() as a, world.office_client() as b:
        recs_a = {r["Email"].lower(): r for r in _all(a, "contacts") if r.get("Email")}
        recs_b = {r["email"].lower(): r for r in _all(b, "contacts") if r.get("email")}
    audit = world.state().audit_log()
    for email in sorted(emails):
        ra, rb = recs_a.get(email, {}), recs_b.get(email, {})
        lines.append(f"-- {email}: A {ra}\n   B {rb}")
        trail = audit.filter(
            (pl.col("a_id") == ra.get("Id", "?")) | (pl.col("b_id") == rb.get("id", "?"))
        )
        lines += [f"   {r}" for r in trail.to_dicts()]
    return "\n".join(lines)


def verify_links(world: SyncWorld) -> None:
    """The flows' own checks from fresh full rescans: every record linked, all agree."""
    store = SnapshotStore(world.data_dir / "verify")
    with world.custom_client() as a, world.office_client() as b:
        for m in MAPPINGS:
            for source, client in ((m.a, a), (m.b, b)):
                take_snapshot(client, source, store, full_rescan=True)
    state = world.state()
    for m in MAPPINGS:
        v = verify_flow(m, store, state)
        assert v.disagreements.height == 0, v.disagreements
        assert v.unlinked_a.height == 0 and v.unlinked_b.height == 0, (v.unlinked_a, v.unlinked_b)
    letters = state.dead_letters()
    if letters.height:
        import polars as pl

        ids = letters["record_id"].to_list()
        audit = state.audit_log().filter(pl.col("b_id").is_in(ids) | pl.col("a_id").is_in(ids))
        for r in audit.to_dicts():
            print("AUDIT", r)
        for r in letters.to_dicts():
            print("DL", r)
        for r in (
            state.links("contact_to_contacts", {}).filter(pl.col("b_id").is_in(ids)).to_dicts()
        ):
            print("LINK", r)
    assert letters.height == 0, letters.to_dicts()


def writes_and_failures(outcome: SyncOutcome) -> tuple[int, int]:
    written = failed = 0
    for asset, meta in outcome.metadata.items():
        if "/writes_to_" in asset:
            written += int(meta.get("created", 0)) + int(meta.get("updated", 0))
            failed += int(meta.get("failed", 0))
    return written, failed


def converge(max_runs: int) -> tuple[int, Counter[str]]:
    """Sync until a run succeeds with nothing left to write or retry; how many runs it took."""
    seen: Counter[str] = Counter()
    for run in range(1, max_runs + 1):
        outcome = execute_sync()
        written, failed = writes_and_failures(outcome)
        seen["writes"] += written
        seen["per-record failures"] += failed
        seen["failed runs"] += 0 if outcome.success else 1
        if outcome.success and written == 0 and failed == 0:
            return run, seen
    raise AssertionError(f"no quiet run within {max_runs} runs: {seen}")


class RetryCounter(logging.Handler):
    """Counts the calls the clients retried (each one a fault the sync rode out)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("retrying after"):
            self.retries += 1


@pytest.fixture
def retries() -> Any:
    counter = RetryCounter()
    logger = logging.getLogger("crm_assets.http")
    logger.addHandler(counter)
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield counter
    logger.removeHandler(counter)
    logger.setLevel(previous)


HEAVY = {
    "error_rate": 0.15,
    "post_write_error_rate": 0.05,
    "drop_rate": 0.05,
    "throttle_rate": 0.02,
    "latency_ms": 5,
}
MODERATE = {
    "error_rate": 0.05,
    "post_write_error_rate": 0.02,
    "drop_rate": 0.02,
    "throttle_rate": 0.01,
}


def dropped(world: SyncWorld) -> int:
    return sum(
        s.log().count("injected fault: dropping the answer")
        for s in (world.custom_crm, world.crm_office)
    )


@pytest.mark.slow
def test_heavy_faults_then_cleared_converge_with_nothing_lost(sync_world: SyncWorld, retries: Any):
    rng = random.Random(8)
    population = Population(sync_world, rng)
    population.add(products=5, contacts=12, merged=2)
    drops_before = dropped(sync_world)
    sync_world.custom_crm.set_faults(**HEAVY)
    sync_world.crm_office.set_faults(**HEAVY, batch_item_error_rate=0.25)
    seen: Counter[str] = Counter()
    for _ in range(2):
        outcome = execute_sync()
        written, failed = writes_and_failures(outcome)
        seen["writes"] += written
        seen["per-record failures"] += failed
        seen["failed runs"] += 0 if outcome.success else 1
    # more records and edits on both sides, then more runs under the same faults
    for service in (sync_world.custom_crm, sync_world.crm_office):
        service.set_faults()
    population.add(products=2, contacts=6, merged=1)
    edits = population.edit_some(8)
    sync_world.custom_crm.set_faults(**HEAVY)
    sync_world.crm_office.set_faults(**HEAVY, batch_item_error_rate=0.25)
    for _ in range(2):
        outcome = execute_sync()
        written, failed = writes_and_failures(outcome)
        seen["per-record failures"] += failed
        seen["failed runs"] += 0 if outcome.success else 1
    drops = dropped(sync_world) - drops_before
    for service in (sync_world.custom_crm, sync_world.crm_office):
        service.set_faults()
    runs, _after = converge(max_runs=5)
    check = check_world(sync_world, population.expected)
    out(
        f"\nfaults (heavy, then cleared): {retries.retries} retried calls (5xx, 429, dropped "
        f"connections; {drops} answers dropped after the work was done), "
        f"{seen['per-record failures']} per-record failures and {seen['failed runs']} failed "
        f"runs under faults; converged {runs} run(s) after the faults were cleared "
        f"(bound 5); {population.expected.records()} entities, {edits} edits, "
        f"{check.records} records and {check.values} values checked on both sides; "
        f"duplicates {check.duplicates}, losses {check.losses}"
    )
    assert not check.problems, check.problems
    verify_links(sync_world)
    assert retries.retries > 0 and seen["per-record failures"] > 0  # the faults did bite


@pytest.mark.slow
def test_moderate_faults_kept_on_converge_within_five_runs(sync_world: SyncWorld, retries: Any):
    rng = random.Random(9)
    population = Population(sync_world, rng)
    population.add(products=4, contacts=10, merged=2)
    sync_world.custom_crm.set_faults(**MODERATE)
    sync_world.crm_office.set_faults(**MODERATE, batch_item_error_rate=0.1)
    first = execute_sync()
    population_edits = 0
    for service in (sync_world.custom_crm, sync_world.crm_office):
        service.set_faults()
    population_edits = population.edit_some(6)
    sync_world.custom_crm.set_faults(**MODERATE)
    sync_world.crm_office.set_faults(**MODERATE, batch_item_error_rate=0.1)
    runs, seen = converge(max_runs=5)
    for service in (sync_world.custom_crm, sync_world.crm_office):
        service.set_faults()
    check = check_world(sync_world, population.expected)
    out(
        f"\nfaults (moderate, kept on): {retries.retries} retried calls, "
        f"{seen['per-record failures'] + writes_and_failures(first)[1]} per-record failures; "
        f"converged in {runs + 1} runs with the faults on (bound 6: the first run and 5 more); "
        f"{population.expected.records()} entities, {population_edits} edits, {check.records} "
        f"records and {check.values} values checked; duplicates {check.duplicates}, "
        f"losses {check.losses}"
    )
    assert not check.problems, check.problems
    verify_links(sync_world)


# -- kill -9 of crm-assets sync in the middle of its writes -------------------------------------
def _count(db: Path, sql: str) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute(sql).fetchone()[0])
    except sqlite3.Error:
        return -1


def _write_marks(world: SyncWorld) -> tuple[int, ...]:
    """Cheap signs of writes in progress: the sync's intents and audit rows, CRM row counts."""
    state = world.data_dir / "state.db"
    return (
        _count(state, "select count(*) from intents"),
        _count(state, "select count(*) from audit"),
        _count(
            world.custom_crm.data_dir / "custom_crm.sqlite", "select sum(version) from contacts"
        ),
        _count(
            world.crm_office.data_dir / "crm_office.sqlite", "select sum(version) from contacts"
        ),
    )


def killed_sync(world: SyncWorld, rng: random.Random, log: Path) -> str:
    """Start ``crm-assets sync``, SIGKILL it at a random moment after its first write."""
    before = _write_marks(world)
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [CRM_ASSETS, "sync"], env=dict(os.environ), stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if _write_marks(world) != before:
                time.sleep(rng.uniform(0.0, 0.6))
                break
            time.sleep(0.01)
        if proc.poll() is not None:
            return "finished"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return "killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_during_writes_then_converges_without_duplicates(sync_world: SyncWorld):
    rng = random.Random(20)
    population = Population(sync_world, rng)
    population.add(products=3, contacts=8, merged=1)
    latency = {"latency_ms": 40}
    outcomes: Counter[str] = Counter()
    checked = Counter[str]()
    log = sync_world.data_dir.parent / "killed-syncs.log"
    sync_world.data_dir.mkdir(parents=True, exist_ok=True)
    trial = 0
    while outcomes["killed"] < 20 and trial < 32:
        trial += 1
        sync_world.custom_crm.set_faults(**latency)
        sync_world.crm_office.set_faults(**latency)
        outcomes[killed_sync(sync_world, rng, log)] += 1
        sync_world.custom_crm.set_faults()
        sync_world.crm_office.set_faults()
        # new work for the next run: records on both sides, edits
        population.add(products=1, contacts=3, merged=1)
        population.edit_some(3)
        if trial % 10 == 0:  # now and then: the next runs converge, nothing duplicated or lost
            runs, _ = converge(max_runs=5)
            check = check_world(sync_world, population.expected)
            assert not check.problems, f"after trial {trial}:\n{explain(sync_world, check)}"
            checked["checkpoints"] += 1
            checked["runs"] += runs
    runs, _ = converge(max_runs=5)
    check = check_world(sync_world, population.expected)
    out(
        f"\nkill -9 of crm-assets sync: {trial} runs started, {outcomes['killed']} killed during "
        f"their writes, {outcomes['finished']} finished first; {checked['checkpoints'] + 1} "
        f"recoveries converged within 5 runs each (the last in {runs}); "
        f"{population.expected.records()} entities, {check.records} records and "
        f"{check.values} values checked ({population.expected.lost_conflicts} lost a conflict to a "
        f"newer record, audited); duplicates {check.duplicates}, losses {check.losses}"
    )
    assert outcomes["killed"] >= 20
    assert not check.problems, explain(sync_world, check)
    verify_links(sync_world)


# -- deterministic regressions, with the in-memory CRMs ------------------------------------------
class Memory:
    def __init__(self, root: Path) -> None:
        clock = SimClock()
        self.a, self.b = MemoryCustomCrm(clock), MemoryCrmOffice(clock)
        self.store = SnapshotStore(root / "snapshots")
        self.state = SyncState(f"sqlite:///{root / 'state.db'}")

    def sync(self) -> None:
        clients = {"custom_crm": self.a, "crm_office": self.b}
        sync_once(MAPPINGS, clients, self.store, self.state)


def test_lost_create_answer_found_by_lookup_leaves_no_dead_letter(tmp_path: Path):
    world = Memory(tmp_path)
    with world.a.as_user():
        world.a.create("contacts", {"Email": "lost@example.com", "FirstName": "Lost"})
    world.b.fail_next(Fault("after"))  # the batch lands, its answer is lost
    world.sync()
    assert world.state.dead_letters().height == 1  # the create, outcome unknown
    world.sync()  # the lookup finds the record: linked, not created again
    assert len(world.b.records["contacts"]) == 1
    assert world.state.dead_letters().height == 0, world.state.dead_letters().to_dicts()
    out("\nlost create answer: 1 record created once, found by lookup, 0 dead letters left")


def test_update_made_moot_by_a_newer_edit_leaves_no_dead_letter(tmp_path: Path):
    world = Memory(tmp_path)
    with world.a.as_user():
        made = world.a.create("contacts", {"Email": "moot@example.com", "Title": "one"})
    world.sync()
    with world.a.as_user():
        world.a.update("contacts", made["Id"], {"Title": "two"})
    world.b.fail_items(1)  # CRMOffice refuses the update (500 for that item)
    world.sync()
    assert world.state.dead_letters().height == 1
    with world.b.as_user():  # a newer edit on CRMOffice: it wins, CRMOffice needs no write
        (office,) = world.b.records["contacts"].values()
        body = {k: v for k, v in office.items() if k not in ("id", "createdAt", "updatedAt")}
        world.b.replace("contacts", office["id"], {**body, "title": "three"})
    world.sync()
    assert world.a.records["contacts"][made["Id"]]["Title"] == "three"
    assert world.state.dead_letters().height == 0, world.state.dead_letters().to_dicts()
    out("\nupdate made moot by a newer edit: the newer value on both sides, 0 dead letters left")
