"""The files one flow's run passes between its steps: mapped sides, the plan, confirmations.

One object owns the layout (``<data dir>/flows/<flow>/runs/<run id>/``), so no
step builds a path of another's: the mapped step saves both sides, the plan
step reads them and saves the plan, the first writes step saves what its CRM
confirmed and the second reads it. Each run has a folder of its own, so a run
that only plans never changes the plan another run is writing; folders of runs
older than a day are removed when a new run starts.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from crm_assets.engine.reconcile import Plan

#: Run folders older than this are removed when a run of the flow starts.
KEEP_RUNS_SECONDS = 24 * 3600

_PLAN_PARTS = (
    "pairs",
    "conflicts",
    "ambiguous",
    "tombstones",
    "deferred",
    "failed",
    "side_effects",
    "copies",
)


@dataclass(frozen=True)
class FlowFiles:
    """Where one run of one flow keeps its intermediate results."""

    folder: Path

    @classmethod
    def of_run(cls, flow_dir: Path, run_id: str) -> FlowFiles:
        return cls(flow_dir / "runs" / run_id)

    def prune_old_runs(self) -> None:
        """Remove the folders of this flow's runs older than :data:`KEEP_RUNS_SECONDS`."""
        cutoff = time.time() - KEEP_RUNS_SECONDS
        for run in self.folder.parent.glob("*"):
            if run != self.folder and run.is_dir() and run.stat().st_mtime < cutoff:
                shutil.rmtree(run, ignore_errors=True)

    def save_mapped(self, a: pl.DataFrame, b: pl.DataFrame) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prune_old_runs()
        a.write_parquet(self.folder / "mapped_a.parquet")
        b.write_parquet(self.folder / "mapped_b.parquet")

    def load_mapped(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        return (
            pl.read_parquet(self.folder / "mapped_a.parquet"),
            pl.read_parquet(self.folder / "mapped_b.parquet"),
        )

    @property
    def plan_dir(self) -> Path:
        return self.folder / "plan"

    def save_plan(self, plan: Plan) -> None:
        """The plan, replacing the last one and its confirmations."""
        folder = self.plan_dir
        folder.mkdir(parents=True, exist_ok=True)
        for part in _PLAN_PARTS:
            getattr(plan, part).write_parquet(folder / f"{part}.parquet")
        for side in ("a", "b"):
            plan.creates[side].write_parquet(folder / f"creates_{side}.parquet")
            plan.deletes[side].write_parquet(folder / f"deletes_{side}.parquet")
        meta = {
            "flow": plan.flow,
            "blocked": plan.blocked,
            "read_only": plan.read_only,
            "rebuild_links": plan.rebuild_links,
            "scope": plan.scope,
            "scoped_records": plan.scoped_records,
            "mark": plan.mark,
        }
        pl.DataFrame([{**meta, "columns": plan.columns, "counts": [plan.counts]}]).write_parquet(
            folder / "plan.parquet"
        )
        (folder / "confirmed.parquet").unlink(missing_ok=True)

    def plan_written_at(self) -> float | None:
        """When the plan was made (epoch seconds), if it was."""
        path = self.plan_dir / "plan.parquet"
        return path.stat().st_mtime if path.exists() else None

    def load_plan(self) -> Plan:
        folder = self.plan_dir
        if not (folder / "plan.parquet").exists():
            raise FileNotFoundError(f"no plan in {folder}: materialize the reconciled asset first")
        meta = pl.read_parquet(folder / "plan.parquet").row(0, named=True)
        parts = {part: pl.read_parquet(folder / f"{part}.parquet") for part in _PLAN_PARTS}
        return Plan(
            flow=meta["flow"],
            columns=list(meta["columns"]),
            creates={s: pl.read_parquet(folder / f"creates_{s}.parquet") for s in ("a", "b")},
            deletes={s: pl.read_parquet(folder / f"deletes_{s}.parquet") for s in ("a", "b")},
            counts=dict(meta["counts"][0]),
            blocked=meta["blocked"],
            read_only=meta["read_only"],
            rebuild_links=meta["rebuild_links"],
            scope=meta["scope"],
            scoped_records=meta["scoped_records"],
            mark=meta["mark"],
            **parts,
        )

    def save_confirmed(self, confirmed: set[str]) -> None:
        """The pairs (by ``a_id``) the first written side confirmed."""
        frame = pl.DataFrame({"a_id": sorted(confirmed)}, schema={"a_id": pl.String})
        frame.write_parquet(self.plan_dir / "confirmed.parquet")

    def load_confirmed(self) -> set[str] | None:
        path = self.plan_dir / "confirmed.parquet"
        return set(pl.read_parquet(path).get_column("a_id").to_list()) if path.exists() else None
