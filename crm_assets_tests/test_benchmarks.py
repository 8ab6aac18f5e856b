"""The benchmark suite still runs: its smallest sizes, as CI's smoke check, with the engine's
plan identical to plain Python's and to DuckDB's, and incremental plans identical to full ones
with the state in SQLite and (when CI gives a server) in PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_smoke_run_reports_identical_plans(tmp_path):
    out = tmp_path / "SMOKE.md"
    out.write_text("## An earlier run\n\nits notes\n")  # kept below this run's part
    # with a test server (.ci/run starts one), the incremental plans also run with the state
    # in PostgreSQL, each checked against a full plan there
    postgres = os.environ.get("CRM_SYNC_TEST_POSTGRES_URL", "")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CRM_SYNC_BENCH_POSTGRES_URL": postgres},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    print(text)
    assert "| 10,000 |" in text and "| yes |" in text  # the two implementations agree
    # the engine, plain Python and DuckDB make one plan (bench.py exits non-zero otherwise)
    assert "## Engine beside DuckDB" in text
    duckdb_rows = [line for line in text.splitlines() if line.startswith("| 10,000 |")]
    assert len(duckdb_rows) == 2 and all("| yes |" in row for row in duckdb_rows), duckdb_rows
    assert "## Incremental run" in text and "### The state in SQLite" in text
    assert ("### The state in PostgreSQL" in text) == bool(postgres)
    assert "## Initial sync over HTTP" in text
    # the smoke sizes are far below the targets': none is scored, and none is called met
    assert "No target applies at these sizes" in text and "targets met" not in text
    assert text.rstrip().endswith("## An earlier run\n\nits notes")


def test_a_benchmark_run_replaces_the_last_one_and_keeps_the_earlier_measurements():
    """`make bench` writes its part of RESULTS.md between two markers: the notes and figures of
    earlier sessions, above and below, survive it (it used to write the whole file)."""
    from benchmarks.bench import LATEST_BEGIN, LATEST_END, Scorecard, place_latest

    card = Scorecard()
    card.add("full plan", "<= 3 s", "2.50 s", True)
    card.add("three steps", "<= 0.5 s", "0.53 s", False)
    card.add("at a smoke size", "<= 0.5 s", "9 s", False, applies=False)
    first = "\n".join(["## The latest run", *card.lines()])
    assert "1 of 2 targets met, 1 **missed**:" in first
    assert "| three steps | <= 0.5 s | 0.53 s | **missed** |" in first
    assert "smoke size" not in first

    history = "# Benchmark results\n\nintro\n\n## Earlier\n\nmeasured on 2026-11-30\n"
    once = place_latest(history, first)
    assert once.startswith(LATEST_BEGIN) and once.endswith(history)
    twice = place_latest(once, "## The latest run\n\nthe second")
    assert "the second" in twice and "1 of 2 targets met" not in twice
    assert twice.count(LATEST_BEGIN) == twice.count(LATEST_END) == 1
    assert twice.endswith(history)
    # a file laid out by hand keeps its order: the run's part stays where it was put
    laid_out = f"# Benchmark results\n\nintro\n\n{LATEST_BEGIN}\nold\n{LATEST_END}\n\n## Earlier\n"
    again = place_latest(laid_out, "new")
    assert (
        again
        == f"# Benchmark results\n\nintro\n\n{LATEST_BEGIN}\nnew\n{LATEST_END}\n\n## Earlier\n"
    )
    assert place_latest("", "new") == f"{LATEST_BEGIN}\nnew\n{LATEST_END}\n"


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"priority": "b", "clock_offsets": (1.5, -7.25), "propagate_deletes": True},
        {"mode": "limited", "enabled_at": "later", "priority": "b"},
    ],
    ids=["defaults", "priority-b-offsets-deletes", "limited"],
)
def test_duckdb_plan_equals_the_engine_beyond_the_synthetic_data(options):
    """Every frame of the DuckDB plan equals the engine's on what the benchmark's data lacks:
    errors, references not linked yet, tombstoned links, first links, empty values, merge keys
    spelled differently (case, no-break and zero-width spaces), equal modification times, and
    (with no link at all) copies."""
    from datetime import timedelta

    import polars as pl

    from benchmarks.duck import reconcile_duck
    from benchmarks.synthetic import T0, contact_mapping, generate
    from crm_assets.engine.mapping import canonical_key, map_side
    from crm_assets.engine.reconcile import ReconcileOptions, reconcile_flow

    mapping = contact_mapping()
    state = generate(3000)
    refs = {"product_to_companies": state.product_links}
    i = pl.int_range(0, pl.len())

    def spoil(frame: pl.DataFrame, side: str) -> pl.DataFrame:
        email = (
            pl.when(i % 23 == 1)
            .then(pl.col("email").str.to_uppercase())
            .when(i % 23 == 2)
            .then(pl.lit("\u00a0") + pl.col("email"))
            .when(i % 23 == 3)
            .then(pl.col("email") + pl.lit("\u200b"))
            .when(i % 23 == 4)
            .then(pl.lit(""))
            .otherwise(pl.col("email"))
        )
        return frame.with_columns(
            email=email,
            title=pl.when(i % 13 == (1 if side == "a" else 2))
            .then(pl.format("{}-{}", pl.lit(side), i))
            .when(i % 17 == 0)
            .then(None)
            .otherwise(pl.col("title")),
            error=pl.when(i % 31 == (3 if side == "a" else 4)).then(pl.lit("bad")),
            unresolved=pl.col("unresolved") | ((i % 19 == 5) if side == "b" else pl.lit(False)),
            deleted=pl.col("deleted") | (i % 37 == (6 if side == "a" else 7)),
            modified=pl.col("modified") + pl.duration(seconds=(i % 3) * (2 if side == "a" else 3)),
        ).with_columns(key0=canonical_key(pl.col("email")))

    a = spoil(map_side(state.a, mapping, "a", refs), "a")
    b = spoil(map_side(state.b, mapping, "b", refs), "b")
    links = state.links.with_columns(tombstoned=i % 29 == 0, has_base=i % 11 != 0).with_columns(
        pl.when(pl.col("has_base")).then(pl.col(f"base.{c}")).alias(f"base.{c}")
        for c in mapping.names
    )
    if options.get("enabled_at") == "later":
        options = {**options, "enabled_at": T0 + timedelta(seconds=1)}
    opts = ReconcileOptions(**options)
    for these_links in (links, links.clear()):
        engine = reconcile_flow(mapping, a, b, these_links, opts)
        duck = reconcile_duck(mapping, a, b, these_links, opts)
        frames = ["pairs", "conflicts", "ambiguous", "tombstones", "deferred", "failed", "copies"]
        for name, e, d in [
            *[(name, getattr(engine, name), getattr(duck, name)) for name in frames],
            *[(f"creates {s}", engine.creates[s], duck.creates[s]) for s in "ab"],
            *[(f"deletes {s}", engine.deletes[s], duck.deletes[s]) for s in "ab"],
        ]:
            assert e.schema == d.schema, (name, e.schema, d.schema)
            assert e.sort(e.columns).equals(d.sort(d.columns)), (name, e.height, d.height)
        assert engine.counts == duck.counts
        assert (engine.blocked, engine.read_only) == (duck.blocked, duck.read_only)
        assert min(engine.counts["conflicts"], engine.counts["deferred"]) > 0
    assert engine.copies.height  # with no link, some creates have a copy already


def test_the_command_a_run_reports_never_shows_a_database_password():
    from benchmarks.bench import shown_command

    shown = shown_command(
        ["--postgres", "postgresql+psycopg://bench:s3cret@db:5432/x", "--no-http"]
    )
    assert "s3cret" not in shown
    assert (
        shown
        == "python -m benchmarks.bench --postgres postgresql+psycopg://bench:***@db:5432/x --no-http"
    )
    assert "s3cret" not in shown_command(["--postgres=postgresql://bench:s3cret@db/x"])
