"""Parquet copies of each flow's links, in the data folder (local or on S3).

Loading every link of a flow from the database costs a pass over all its rows (900k
links with their base values: 1.25 s from SQLite, 2.3 s from PostgreSQL, on 2 cores);
its Parquet copy reads in 0.07 s. The database stays the only truth: each write of links
takes the next number of a counter in the database and stamps it on the links it saves,
so a copy made when the counter stood at ``n`` is brought up to date by the links stamped
above ``n``. A copy is read only for the database it was made from (a random number
drawn when that database was made) and never when it is newer than the counter (a
database restored from a backup); anything that cannot be read is no copy at all. In
the data folder, the copies follow it to S3 (``CRM_SYNC_DATA_URL``): a new run pod then
loads them as the last pod left them, instead of every link from the database.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import polars as pl

from crm_assets.engine.storage import Storage, StorageError

log = logging.getLogger(__name__)


def copies_folder(data: Storage) -> Storage:
    """Where a data folder keeps the link copies (the CLI's and the resource's state)."""
    return data.child("state-links")


#: A copy is written again once the links written since it are this share of it: until
#: then each load reads those few rows from the database (through an index) instead.
REFRESH_SHARE = 0.02


@dataclass(frozen=True)
class LinkCopy:
    """A flow's links as the database held them when its link counter stood at
    ``generation``; ``layout``: the base columns it holds (``{}``: digests only)."""

    frame: pl.DataFrame
    generation: int
    layout: dict[str, pl.DataType]


def base_layout(frame: pl.DataFrame) -> dict[str, pl.DataType]:
    """The base columns of links as :meth:`SyncState.links` gives them, by column name."""
    return {
        name.removeprefix("base."): dtype
        for name, dtype in frame.schema.items()
        if name.startswith("base.")
    }


class LinkCopies:
    """The copies of one state database's flows, one Parquet object each in ``folder``."""

    def __init__(self, folder: Storage) -> None:
        self.folder = folder

    @staticmethod
    def name(flow: str) -> str:
        """The object a flow's copy is kept in (flow names may hold any character)."""
        return f"{hashlib.sha256(flow.encode()).hexdigest()[:24]}.parquet"

    def read(
        self, flow: str, database: str, counter: int, columns: Mapping[str, pl.DataType]
    ) -> LinkCopy | None:
        """The flow's copy, if it is of ``database``, not newer than ``counter`` and holds
        ``columns`` as they are typed (any copy when ``columns`` is empty)."""
        name = self.name(flow)
        try:
            data = self.folder.read_bytes(name)
            if data is None:
                return None
            found = pl.read_parquet_metadata(io.BytesIO(data))
            if (found.get("database"), found.get("flow")) != (database, flow):
                return None
            generation = int(found["generation"])
            if generation > counter:
                return None
            frame = pl.read_parquet(data)
        except (StorageError, OSError, ValueError, KeyError, pl.exceptions.PolarsError) as exc:
            log.warning(
                "link copy %s not read (%s): loading from the database", self.folder.uri(name), exc
            )
            return None
        layout = base_layout(frame)
        if columns and layout != dict(columns):
            return None
        return LinkCopy(frame, generation, layout)

    def write(self, flow: str, database: str, generation: int, frame: pl.DataFrame) -> None:
        """Keep ``frame`` as the flow's copy at ``generation``, as one whole object (a
        reader finds the old copy or the new one). A folder that cannot be written leaves
        loads to the database, with a warning."""
        name = self.name(flow)
        metadata = {"database": database, "flow": flow, "generation": str(generation)}
        try:
            self.folder.write_parquet(frame, name, metadata=metadata, compression="lz4")
        except (StorageError, OSError) as exc:
            log.warning(
                "link copy %s not written (%s): loads read the database", self.folder.uri(name), exc
            )
