"""The files one flow's run passes between its steps: the mapped sides and the plan.

One object owns the layout (``<data folder>/flows/<flow>/runs/<run id>/``), so no
step builds a path of another's: the mapped step saves both sides, the plan
step reads them and saves the plan, the writes step reads the plan. Each run
has a folder of its own, so a run that only plans never changes the plan
another run is writing; folders of runs older than a day are removed when a
new run starts.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any

import polars as pl

from crm_assets.engine.incremental import MappedSide
from crm_assets.engine.reconcile import Plan
from crm_assets.engine.snapshot import KeptFrame
from crm_assets.engine.storage import Storage

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

    runs: Storage
    run_id: str

    @classmethod
    def of_run(cls, data: Storage, flow: str, run_id: str) -> FlowFiles:
        """One run's files of a flow in the data folder ``data``."""
        return cls(data.child("flows", flow, "runs"), run_id)

    @property
    def folder(self) -> Storage:
        return self.runs.child(self.run_id)

    @property
    def plan_dir(self) -> Storage:
        return self.folder.child("plan")

    def prune_old_runs(self) -> None:
        """Remove the folders of this flow's runs older than :data:`KEEP_RUNS_SECONDS`."""
        cutoff = time.time() - KEEP_RUNS_SECONDS
        for run, newest, keys in self.runs.folders():
            if run != self.run_id and newest < cutoff:
                self.runs.remove_keys(keys)

    def save_mapped(self, a: MappedSide, b: MappedSide) -> None:
        """Each side's rows mapped now, naming the kept frame they update (not a copy)."""
        self.prune_old_runs()
        for name, side in (("a", a), ("b", b)):
            meta = {"kept": side.kept.path} if side.kept is not None else None
            self.folder.write_parquet(side.fresh, f"mapped_{name}.parquet", metadata=meta)

    def mapped_sides(self) -> tuple[MappedSide, MappedSide]:
        """Both sides as the mapped step saved them: the rows mapped anew and the kept frame
        they update, which a plan decodes only as far as it needs."""
        return self._mapped("a"), self._mapped("b")

    def _mapped(self, side: str) -> MappedSide:
        data = self._bytes(self.folder, f"mapped_{side}.parquet")
        fresh, meta = pl.read_parquet(io.BytesIO(data)), pl.read_parquet_metadata(io.BytesIO(data))
        if "kept" not in meta:
            return MappedSide(fresh)
        root = Storage(self.runs.store, self.runs.url)
        kept = root.read_bytes(meta["kept"])
        if kept is None:
            raise FileNotFoundError(
                f"no {root.uri(meta['kept'])} (kept frames are removed after a day): "
                "run the flow again"
            )
        return MappedSide(fresh, KeptFrame.of(meta["kept"], kept))

    def save_unlinked(self, table: pl.DataFrame) -> None:
        """The unlinked records as the run's verification found them, for its unlinked step."""
        self.folder.write_parquet(table, "unlinked.parquet")

    def load_unlinked(self) -> pl.DataFrame | None:
        """The run's verification's unlinked records, if it saved them."""
        data = self.folder.read_bytes("unlinked.parquet")
        return None if data is None else pl.read_parquet(io.BytesIO(data))

    def save_plan(self, plan: Plan) -> None:
        """The plan, replacing the last one and its confirmations."""
        folder = self.plan_dir
        for part in _PLAN_PARTS:
            folder.write_parquet(getattr(plan, part), f"{part}.parquet")
        for side in ("a", "b"):
            folder.write_parquet(plan.creates[side], f"creates_{side}.parquet")
            folder.write_parquet(plan.deletes[side], f"deletes_{side}.parquet")
        meta = {
            "flow": plan.flow,
            "blocked": plan.blocked,
            "read_only": plan.read_only,
            "rebuild_links": plan.rebuild_links,
            # its own time, not the object's: an S3 object's time has whole seconds only
            "made_at": time.time(),
            "scope": plan.scope,
            "scoped_records": plan.scoped_records,
            "mark": plan.mark,
        }
        folder.write_parquet(
            pl.DataFrame([{**meta, "columns": plan.columns, "counts": [plan.counts]}]),
            "plan.parquet",
        )

    def plan_meta(self) -> dict[str, Any] | None:
        """The plan's flow, counts and verdicts, if a plan was made."""
        frame = self.plan_dir.read_parquet("plan.parquet")
        return None if frame is None else frame.row(0, named=True)

    def plan_written_at(self) -> float | None:
        """When the plan was made (epoch seconds), if it was."""
        meta = self.plan_meta()
        return None if meta is None else meta["made_at"]

    def load_plan(self) -> Plan:
        folder = self.plan_dir
        meta = self.plan_meta()
        if meta is None:
            raise FileNotFoundError(
                f"no plan in {folder.uri()}: materialize the reconciled asset first"
            )
        parts = {part: self._read(folder, f"{part}.parquet") for part in _PLAN_PARTS}
        return Plan(
            flow=meta["flow"],
            columns=list(meta["columns"]),
            creates={s: self._read(folder, f"creates_{s}.parquet") for s in ("a", "b")},
            deletes={s: self._read(folder, f"deletes_{s}.parquet") for s in ("a", "b")},
            counts=dict(meta["counts"][0]),
            blocked=meta["blocked"],
            read_only=meta["read_only"],
            rebuild_links=meta["rebuild_links"],
            scope=meta["scope"],
            scoped_records=meta["scoped_records"],
            mark=meta["mark"],
            **parts,
        )

    @staticmethod
    def _read(folder: Storage, name: str) -> pl.DataFrame:
        return pl.read_parquet(io.BytesIO(FlowFiles._bytes(folder, name)))

    @staticmethod
    def _bytes(folder: Storage, name: str) -> bytes:
        """A file the run's earlier step wrote: missing, it is an error naming where."""
        data = folder.read_bytes(name)
        if data is None:
            raise FileNotFoundError(f"no {folder.uri(name)}: run the flow's earlier steps first")
        return data
