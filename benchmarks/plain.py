"""The reconcile rules as a plain per-record Python implementation, for the benchmark.

It reads the same mapped frames and links as :func:`crm_assets.engine.reconcile.reconcile_flow`
(converted to Python rows outside the timing) and applies DESIGN section 5 record by
record, the way one would write it without a dataframe library. The benchmark
asserts that both give the same plan.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

Row = dict[str, Any]


def reconcile_plain(
    cols: list[str],
    merge_count: int,
    a_rows: list[Row],
    b_rows: list[Row],
    link_rows: list[Row],
    priority: str = "a",
) -> dict[str, set[tuple[Any, ...]]]:
    """The plan as sets of tuples (see :func:`plan_signature` for the polars side)."""
    a_by_id = {r["id"]: r for r in a_rows}
    b_by_id = {r["id"]: r for r in b_rows}
    linked_a = {link["a_id"] for link in link_rows}
    linked_b = {link["b_id"] for link in link_rows}
    out: dict[str, set[tuple[Any, ...]]] = {
        k: set()
        for k in (
            "pairs",
            "creates_a",
            "creates_b",
            "conflicts",
            "ambiguous",
            "tombstones",
            "deferred",
            "failed",
        )
    }
    pairs: list[tuple[Row, Row, Row | None, bool]] = []
    for link in link_rows:
        if link["tombstoned"]:
            continue
        a, b = a_by_id.get(link["a_id"]), b_by_id.get(link["b_id"])
        a_gone = a is None or a["deleted"]
        b_gone = b is None or b["deleted"]
        if a_gone or b_gone:
            side = "both" if a_gone and b_gone else ("a" if a_gone else "b")
            out["tombstones"].add((link["a_id"], link["b_id"], side))
            continue
        pairs.append((a, b, link if link["has_base"] else None, False))

    unlinked_a = [r for r in a_rows if r["id"] not in linked_a and not r["deleted"]]
    unlinked_b = [r for r in b_rows if r["id"] not in linked_b and not r["deleted"]]
    candidates: set[tuple[str, str]] = set()
    for i in range(merge_count):
        index: dict[Any, list[str]] = defaultdict(list)
        for r in unlinked_b:
            if r[f"key{i}"] is not None:
                index[r[f"key{i}"]].append(r["id"])
        for r in unlinked_a:
            if r[f"key{i}"] is not None:
                for b_id in index.get(r[f"key{i}"], ()):
                    candidates.add((r["id"], b_id))
    of_a: dict[str, set[str]] = defaultdict(set)
    of_b: dict[str, set[str]] = defaultdict(set)
    for a_id, b_id in candidates:
        of_a[a_id].add(b_id)
        of_b[b_id].add(a_id)
    matched = {
        (a_id, b_id) for a_id, b_id in candidates if len(of_a[a_id]) == 1 and len(of_b[b_id]) == 1
    }
    matched_a = {a for a, _ in matched}
    matched_b = {b for _, b in matched}
    for a_id, bs in of_a.items():
        if a_id not in matched_a:
            out["ambiguous"].add(("a", a_id, len(bs)))
    for b_id, as_ in of_b.items():
        if b_id not in matched_b:
            out["ambiguous"].add(("b", b_id, len(as_)))
    for a_id, b_id in matched:
        pairs.append((a_by_id[a_id], b_by_id[b_id], None, True))

    for r in unlinked_a:
        if r["error"] is not None:
            continue
        if r["id"] not in of_a:
            out["creates_b"].add((r["id"], *(r[c] for c in cols)))
    for r in unlinked_b:
        if r["id"] in of_b or r["error"] is not None:
            continue
        if r["unresolved"]:
            out["deferred"].add(("b", r["id"]))
        else:
            out["creates_a"].add((r["id"], *(r[c] for c in cols)))
    for side, rows in (("a", a_rows), ("b", b_rows)):
        for r in rows:
            if r["error"] is not None and not r["deleted"]:
                out["failed"].add((side, r["id"], r["error"]))

    for a, b, base_link, new_link in pairs:
        if a["error"] is not None or b["error"] is not None:
            continue
        if a["unresolved"] or b["unresolved"]:
            out["deferred"].add(("b", b["id"]))
            continue
        finals = []
        rebase = new_link or base_link is None
        a_newer = a["modified"] > b["modified"]
        b_newer = b["modified"] > a["modified"]
        for c in cols:
            va, vb = a[c], b[c]
            if va == vb:
                final, conflict = va, False
            elif base_link is not None:
                base = base_link[f"base.{c}"]
                if va == base:
                    final, conflict = vb, False
                elif vb == base:
                    final, conflict = va, False
                else:
                    final, conflict = _newer(va, vb, a_newer, b_newer, priority), True
            elif va is None:
                final, conflict = vb, False
            elif vb is None:
                final, conflict = va, False
            else:
                final, conflict = _newer(va, vb, a_newer, b_newer, priority), True
            if conflict:
                winner = "a" if final == va else "b"
                out["conflicts"].add((a["id"], b["id"], c, _text(va), _text(vb), winner))
            if base_link is not None and final != base_link[f"base.{c}"]:
                rebase = True
            finals.append(final)
        write_a = any(f != a[c] for f, c in zip(finals, cols, strict=True))
        write_b = any(f != b[c] for f, c in zip(finals, cols, strict=True))
        if write_a or write_b or rebase:
            out["pairs"].add((a["id"], b["id"], new_link, write_a, write_b, *finals))
    return out


def _newer(va: Any, vb: Any, a_newer: bool, b_newer: bool, priority: str) -> Any:
    if a_newer:
        return va
    if b_newer:
        return vb
    return va if priority == "a" else vb


def _text(value: Any) -> str | None:
    """As polars casts a value to text."""
    if isinstance(value, bool):
        return str(value).lower()
    return None if value is None else str(value)


def plan_signature(plan: Any) -> dict[str, set[tuple[Any, ...]]]:
    """The polars plan as the same sets of tuples as :func:`reconcile_plain` returns."""
    cols = plan.columns
    pairs = plan.pairs.select(
        "a_id", "b_id", "new_link", "write_a", "write_b", *[f"final.{c}" for c in cols]
    )
    return {
        "pairs": set(pairs.iter_rows()),
        "creates_a": {r for r in plan.creates["a"].select("source_id", *cols).iter_rows()},
        "creates_b": {r for r in plan.creates["b"].select("source_id", *cols).iter_rows()},
        "conflicts": set(
            plan.conflicts.select(
                "a_id", "b_id", "field", "a_value", "b_value", "winner"
            ).iter_rows()
        ),
        "ambiguous": set(plan.ambiguous.iter_rows()),
        "tombstones": set(plan.tombstones.iter_rows()),
        "deferred": set(plan.deferred.select("side", "id").iter_rows()),
        "failed": set(plan.failed.iter_rows()),
    }
