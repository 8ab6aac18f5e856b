"""The reconcile rules as SQL on DuckDB, for the benchmark.

It reads the same mapped frames and links as :func:`crm_assets.engine.reconcile.reconcile_flow`
and applies DESIGN section 5 the way one would write it in SQL: linking (links kept, a merge
key matching exactly one unlinked record on each side links it, two or more candidates is
ambiguous, none is a create), the three-way merge with its conflict rule, creates,
tombstones, deferred and failed records. The polars frames reach DuckDB without a copy
(the Arrow C stream interface: DuckDB scans polars' own buffers) and the plan comes back as
polars frames in the engine's :class:`~crm_assets.engine.reconcile.Plan` shapes, so the
benchmark compares all three implementations with
:func:`benchmarks.plain.plan_signature`.

It takes the engine's one shortcut too, so that both do the same work: the live links are
joined with both sides on ids and one hash of the mapped values per side, and only the pairs
that changed since their base have their values gathered and merged. DuckDB cannot see how
many rows an Arrow stream holds (it estimates one), so its join reordering is switched off
and each join is written with the large side first, the side its hash table is built on last.

Not covered (the benchmark does not use them, and the function refuses them): creates whose
outcome is unknown (``pending_creates``), references cleared by deletes
(``gone_references``, so ``side_effects`` is always empty) and rebuilding lost links.

Merge keys compare in canonical form as :func:`crm_assets.engine.mapping.canonical_key`
builds it (NFC, lower case, ``ß`` as ``ss``, no space or invisible character, empty is no
key). DuckDB's ``lower`` maps one code point to one, so the few characters whose full lower
case differs (``İ``, a word-final ``Σ``) would compare differently from the engine; the
synthetic data has none.
"""

from __future__ import annotations

from typing import Any

import duckdb
import polars as pl

from crm_assets.engine.mapping import FlowMapping
from crm_assets.engine.reconcile import SIDES, Plan, ReconcileOptions, live_count, plan_counts
from crm_assets.engine.reconcile import _breaker as circuit_breaker  # the engine's own rule 6

#: Every Unicode space and invisible formatting character, as the engine's
#: ``[\s\x1c-\x1f\p{Cf}]`` (Rust's ``\s`` is Unicode White_Space; RE2's is ASCII only,
#: hence the longer class)
INVISIBLE = r"[\t\n\x0B\f\r\x1C-\x1F\x{85}\p{Z}\p{Cf}]"
#: The ASCII characters of ``INVISIBLE``: pure-ASCII keys take this cheaper path, as the
#: engine's do.
ASCII_SPACE = r"[\t-\r\x1C-\x1F ]"

#: How polars writes a UTC time as text (the conflicts' a_modified and b_modified)
POLARS_UTC_TEXT = "%Y-%m-%d %H:%M:%S.%f+00:00"

DEFERRED_REASON = "reference not linked yet"


class ArrowStream:
    """A polars frame as DuckDB reads it without a copy: through the Arrow PyCapsule stream
    interface, over polars' own buffers. (DuckDB reads a polars frame registered as itself
    through ``to_arrow()``, which needs pyarrow and copies polars' strings into Arrow's
    older string layout.)"""

    def __init__(self, frame: pl.DataFrame) -> None:
        self.frame = frame

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        return self.frame.__arrow_c_stream__(requested_schema)


def q(name: str) -> str:
    """A quoted SQL identifier (the canonical columns have dots: ``company.id``)."""
    return '"' + name.replace('"', '""') + '"'


def reconcile_duck(
    mapping: FlowMapping,
    a: pl.DataFrame,
    b: pl.DataFrame,
    links: pl.DataFrame,
    options: ReconcileOptions | None = None,
) -> Plan:
    """The plan for one flow, as :func:`~crm_assets.engine.reconcile.reconcile_flow` makes it."""
    options = options or ReconcileOptions()
    if options.rebuild_links:
        raise NotImplementedError("rebuilding lost links is the engine's alone")
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")  # times come back as the engine's UTC datetimes
        # DuckDB cannot see how many rows an Arrow stream holds (it estimates one), so it would
        # build its hash tables on the million-row sides: the joins run in the order written,
        # the large side first, the side the hash table is built on last
        con.execute("SET disabled_optimizers = 'join_order,build_side_probe_side'")
        for name, frame in (("a", a), ("b", b), ("links", links)):
            con.register(name, ArrowStream(frame))
        return _plan(con, mapping, options, links, {"a": live_count(a), "b": live_count(b)})
    finally:
        con.close()


def _plan(
    con: duckdb.DuckDBPyConnection,
    mapping: FlowMapping,
    options: ReconcileOptions,
    links: pl.DataFrame,
    held: dict[str, int],
) -> Plan:
    sql = Sql(mapping, options, has_links=bool(links.height))
    for statement in sql.setup():
        con.execute(statement)

    def frame(query: str) -> pl.DataFrame:
        return pl.DataFrame(con.sql(query))

    plan = Plan(
        flow=mapping.name,
        columns=mapping.names,
        pairs=frame(sql.pairs()),
        creates={"a": frame(sql.creates("b")), "b": frame(sql.creates("a"))},
        conflicts=frame(sql.conflicts()),
        ambiguous=frame(sql.ambiguous()),
        tombstones=frame(sql.tombstones()),
        deletes={side: frame(sql.deletes(side)) for side in SIDES},
        deferred=frame(sql.deferred()),
        failed=frame(sql.failed()),
        copies=frame(sql.copies()),
        read_only=options.mode == "read_only",
    )
    plan.counts = plan_counts(plan)
    (live,) = con.execute(sql.live_links()).fetchall()[0]
    plan.blocked = circuit_breaker(plan, (lambda: live, live), options, mapping, held)
    return plan


class Sql:
    """The statements of one plan, written out for one flow's columns."""

    def __init__(self, mapping: FlowMapping, options: ReconcileOptions, has_links: bool) -> None:
        self.cols = mapping.names
        self.keys = mapping.key_columns
        self.merge_count = len(mapping.merge)
        self.refs = [c.name for c in mapping.columns if c.reference]
        self.options = options
        self.has_links = has_links

    # -- helpers -------------------------------------------------------------------------------
    def same(self, c: str, x: str, y: str) -> str:
        """Column ``c`` holds the same value in versions ``x`` and ``y`` (``a``, ``b``, ``base``,
        ``final``) of a pair: merge keys in canonical form, the rest exactly."""
        if c in self.keys:
            return f"{q(f'canon.{x}.{c}')} IS NOT DISTINCT FROM {q(f'canon.{y}.{c}')}"
        return f"{q(f'{x}.{c}')} IS NOT DISTINCT FROM {q(f'{y}.{c}')}"

    def canonical(self, *versions: str) -> str:
        """The canonical form of every merge key column in these versions of a pair."""
        return "".join(
            f", canon({q(f'{v}.{c}')}) AS {q(f'canon.{v}.{c}')}"
            for v in versions
            for c in self.cols
            if c in self.keys
        )

    def record(self, side: str, alias: str) -> str:
        """A record's columns as one side of a pair: ``"a.email"``, ..."""
        names = ["modified", "version", "error", "unresolved", *self.cols]
        return ", ".join(f"{alias}.{q(n)} AS {q(f'{side}.{n}')}" for n in names)

    def row_hash(self, prefix: str = "") -> str:
        """One hash of a record's (or a base's) mapped values."""
        if not self.cols:  # a flow with no property rows: every record hashes alike
            return "0"
        return "hash(" + ", ".join(q(prefix + c) for c in self.cols) + ")"

    def limited(self, alias: str) -> str:
        """Mode ``limited``: only records created after the flow was enabled are created."""
        if self.options.mode == "limited" and self.options.enabled_at is not None:
            return f"AND {alias}.created >= '{self.options.enabled_at.isoformat()}'::TIMESTAMPTZ"
        return ""

    # -- the tables every part of the plan reads -----------------------------------------------
    def setup(self) -> list[str]:
        """Macros and tables: the live links with the state of their records, the unlinked
        records on each side, the merge candidates and the merged pairs."""
        return [
            # a merge key as keys compare (crm_assets.engine.mapping.canonical_key)
            f"""
            CREATE TEMP MACRO canon(x) AS nullif(
                CASE WHEN strlen(CAST(x AS VARCHAR)) = length(CAST(x AS VARCHAR))
                THEN regexp_replace(lower(CAST(x AS VARCHAR)), '{ASCII_SPACE}', '', 'g')
                ELSE regexp_replace(
                    replace(lower(nfc_normalize(CAST(x AS VARCHAR))), 'ß', 'ss'),
                    '{INVISIBLE}', '', 'g')
                END,
                '')
            """,
            self._known(),
            # rule 1: a record in any link (a tombstoned one too) is not matched or created again
            *[
                f"""
                CREATE TEMP TABLE unlinked_{side} AS
                SELECT * FROM {side} AS r
                WHERE NOT r.deleted
                  AND NOT EXISTS (SELECT 1 FROM links AS l WHERE l.{side}_id = r.id)
                """
                for side in ("a", "b")
            ],
            self._candidates(),
            self._merged(),
        ]

    def _known(self) -> str:
        """The live links, joined on ids and one hash of the mapped values per side, as the
        engine does (values are gathered later, for the pairs that changed only): which side's
        record is gone (rule 5) and whether the pair is quiet, its both sides still as the base
        (rule 4: it writes nothing). A hash collision could hide a change, odds about 2^-64."""
        return f"""
            CREATE TEMP TABLE known AS
            WITH live AS (
                SELECT a_id, b_id, has_base, {self.row_hash("base.")} AS base_hash
                FROM links WHERE NOT tombstoned
            ),
            a_state AS (SELECT id, deleted, unresolved, error, {self.row_hash()} AS hash FROM a),
            b_state AS (SELECT id, deleted, unresolved, error, {self.row_hash()} AS hash FROM b),
            joined AS (
                SELECT l.a_id, l.b_id, l.has_base, l.base_hash,
                       coalesce(a.deleted, true) AS a_gone, coalesce(b.deleted, true) AS b_gone,
                       a.hash AS a_hash, b.hash AS b_hash,
                       a.unresolved OR b.unresolved AS waiting,
                       a.error IS NOT NULL OR b.error IS NOT NULL AS bad
                FROM live AS l
                LEFT JOIN a_state AS a ON a.id = l.a_id
                LEFT JOIN b_state AS b ON b.id = l.b_id
            )
            SELECT a_id, b_id,
                   CASE WHEN a_gone AND b_gone THEN 'both'
                        WHEN a_gone THEN 'a'
                        WHEN b_gone THEN 'b' END AS deleted_side,
                   has_base AND a_hash = base_hash AND b_hash = base_hash
                       AND NOT waiting AND NOT bad AS quiet
            FROM joined
        """

    def _candidates(self) -> str:
        """Pairs of unlinked records sharing a merge key, with how many records each one of
        them matches on the other side (merge keys are canonical already: key0, key1, ...)."""
        joins = (
            "\n                UNION\n".join(
                f"""
                SELECT ua.id AS a_id, ub.id AS b_id
                FROM unlinked_a AS ua JOIN unlinked_b AS ub ON ua.key{i} = ub.key{i}"""
                for i in range(self.merge_count)
            )
            or "SELECT NULL::VARCHAR AS a_id, NULL::VARCHAR AS b_id WHERE false"
        )
        return f"""
            CREATE TEMP TABLE candidates AS
            WITH pairs AS ({joins}
            )
            SELECT a_id, b_id,
                   count(*) OVER (PARTITION BY a_id) AS a_n,
                   count(*) OVER (PARTITION BY b_id) AS b_n
            FROM pairs
        """

    def _merged(self) -> str:
        """Every pair to merge (kept links that changed since the last sync, and new links)
        with its final values, its conflicts and what it writes."""
        cols = self.cols
        offset_a, offset_b = (round(s * 1e6) for s in self.options.clock_offsets)
        base_values = "".join(f", l.{q('base.' + c)}" for c in cols)
        base_nulls = "".join(f", NULL AS {q('base.' + c)}" for c in cols)
        # a side-b reference not linked yet reads as unchanged: the base, on a first link side a's
        waiting_refs = ", ".join(
            f"""CASE WHEN coalesce("b.unresolved", false)
                              THEN CASE WHEN has_base THEN {q("base." + c)} ELSE {q("a." + c)} END
                              ELSE {q("b." + c)} END AS {q("b." + c)}"""
            for c in self.refs
        )
        replace = f"REPLACE ({waiting_refs})" if self.refs else ""
        merged = ",".join(self._merge_column(c) for c in cols)
        write = {
            side: " OR ".join(f"NOT ({self.same(c, 'final', side)})" for c in cols) or "false"
            for side in ("a", "b")
        }
        rebase = "".join(f"{q('final.' + c)} IS DISTINCT FROM {q('base.' + c)} OR " for c in cols)
        helpers = ", ".join(
            [
                '"a.error"',
                '"b.error"',
                '"a.modified"',
                '"b.modified"',
                *[q(f"base.{c}") for c in cols],
                *[q(f"canon.{v}.{c}") for v in ("a", "b", "base", "final") for c in self.keys],
            ]
        )
        return f"""
            CREATE TEMP TABLE merged AS
            WITH changed AS (
                -- rule 1: linked pairs stay linked; the pairs that are not quiet are gathered
                SELECT a_id, b_id FROM known WHERE deleted_side IS NULL AND NOT quiet
            ),
            -- each large side joined to the few changed pairs (the join order as written)
            changed_base AS (
                SELECT l.* FROM links AS l
                JOIN changed AS c ON c.a_id = l.a_id AND c.b_id = l.b_id
            ),
            changed_a AS (
                SELECT l.a_id, l.b_id, l.has_base{base_values}, {self.record("a", "a")}
                FROM a JOIN changed_base AS l ON l.a_id = a.id
            ),
            kept AS (
                SELECT l.*, false AS new_link, {self.record("b", "b")}
                FROM b JOIN changed_a AS l ON l.b_id = b.id
            ),
            new_links AS (
                -- a merge key matching exactly one unlinked record on each side links them
                SELECT c.a_id, c.b_id, true AS new_link, false AS has_base,
                       {self.record("a", "a")}, {self.record("b", "b")}{base_nulls}
                FROM candidates AS c
                JOIN unlinked_a AS a ON a.id = c.a_id
                JOIN unlinked_b AS b ON b.id = c.b_id
                WHERE c.a_n = 1 AND c.b_n = 1
            ),
            pairs AS (
                SELECT * FROM kept
                UNION ALL BY NAME
                SELECT * FROM new_links
            ),
            usable AS (
                -- a pair with a record that cannot be read is left out (it is failed); the
                -- modification times on the sync host's clock (each CRM's offset taken off)
                SELECT * {replace},
                       "a.modified" - to_microseconds({offset_a}) AS a_time,
                       "b.modified" - to_microseconds({offset_b}) AS b_time
                FROM pairs
                WHERE "a.error" IS NULL AND "b.error" IS NULL
            ),
            canonical AS (SELECT *{self.canonical("a", "b", "base")} FROM usable),
            three_way AS (
                -- rule 3: the three-way merge
                SELECT *,{merged}
                FROM canonical
            ),
            final AS (SELECT *{self.canonical("final")} FROM three_way)
            SELECT * EXCLUDE ({helpers}),
                   {write["a"]} AS write_a,
                   {write["b"]} AS write_b,
                   {rebase}new_link OR NOT has_base AS rebase
            FROM final
        """

    def _merge_column(self, c: str) -> str:
        """Column ``c``'s final value and whether both sides changed it differently.

        One side changed: it wins; both changed differently: the newer modification wins, a
        tie goes to the priority side; on a first link (no base) filled beats empty."""
        a, b = q(f"a.{c}"), q(f"b.{c}")
        prio = a if self.options.priority == "a" else b
        same_ab = self.same(c, "a", "b")
        a_changed = f"NOT ({self.same(c, 'a', 'base')})"
        b_changed = f"NOT ({self.same(c, 'b', 'base')})"
        by_time = (
            f"CASE WHEN a_time > b_time THEN {a} WHEN b_time > a_time THEN {b} ELSE {prio} END"
        )
        return f"""
                   CASE WHEN has_base THEN
                            CASE WHEN NOT {a_changed} THEN {b}
                                 WHEN NOT {b_changed} THEN {a}
                                 WHEN {same_ab} THEN {a}
                                 ELSE {by_time} END
                        ELSE CASE WHEN {same_ab} THEN {a}
                                  WHEN {a} IS NULL THEN {b}
                                  WHEN {b} IS NULL THEN {a}
                                  ELSE {by_time} END
                   END AS {q("final." + c)},
                   CASE WHEN has_base THEN {a_changed} AND {b_changed} AND NOT ({same_ab})
                        ELSE {a} IS NOT NULL AND {b} IS NOT NULL AND NOT ({same_ab})
                   END AS {q("conflict." + c)}"""

    # -- the parts of the plan ---------------------------------------------------------------------
    def pairs(self) -> str:
        """The pairs that write a side or re-base their link (rule 4: the rest write nothing)."""
        values = "".join(f", {q(f'{s}.{c}')}" for s in ("a", "b", "final") for c in self.cols)
        return f"""
            SELECT a_id, b_id, new_link, write_a, write_b,
                   "a.version" AS a_version, "b.version" AS b_version{values}
            FROM merged
            WHERE write_a OR write_b OR rebase
        """

    def conflicts(self) -> str:
        """Per column, the pairs whose two sides changed it differently, with the corrected
        modification times compared (as text, as the engine writes them)."""
        parts = [
            f"""
            SELECT a_id, b_id, '{c}' AS field,
                   CAST({q("a." + c)} AS VARCHAR) AS a_value,
                   CAST({q("b." + c)} AS VARCHAR) AS b_value,
                   CASE WHEN {q("final." + c)} IS NOT DISTINCT FROM {q("a." + c)}
                        THEN 'a' ELSE 'b' END AS winner,
                   strftime(a_time, '{POLARS_UTC_TEXT}') AS a_modified,
                   strftime(b_time, '{POLARS_UTC_TEXT}') AS b_modified
            FROM merged
            WHERE {q("conflict." + c)}"""
            for c in self.cols
        ]
        empty = """
            SELECT NULL::VARCHAR AS a_id, NULL::VARCHAR AS b_id, NULL::VARCHAR AS field,
                   NULL::VARCHAR AS a_value, NULL::VARCHAR AS b_value, NULL::VARCHAR AS winner,
                   NULL::VARCHAR AS a_modified, NULL::VARCHAR AS b_modified
            WHERE false"""
        return "\n            UNION ALL".join(parts) or empty

    def ambiguous(self) -> str:
        """Records with merge candidates that were not linked: two or more candidates on one
        side or the other (neither linked nor created)."""
        return """
            SELECT DISTINCT 'a' AS side, a_id AS id, CAST(a_n AS UINTEGER) AS candidates
            FROM candidates WHERE NOT (a_n = 1 AND b_n = 1)
            UNION ALL
            SELECT DISTINCT 'b' AS side, b_id AS id, CAST(b_n AS UINTEGER) AS candidates
            FROM candidates WHERE NOT (a_n = 1 AND b_n = 1)
            ORDER BY side, id
        """

    def _to_create(self, side: str) -> str:
        """Unlinked records of ``side`` that no merge criterion matched (to create on the
        other side), before the checks of mode ``limited`` and of errors."""
        if not self.cols:  # a flow with no property rows only links
            return f"SELECT * FROM unlinked_{side} WHERE false"
        return f"""
            SELECT * FROM unlinked_{side} AS r
            WHERE NOT EXISTS (SELECT 1 FROM candidates AS c WHERE c.{side}_id = r.id)"""

    def creates(self, from_side: str) -> str:
        """Records to create on the other side: source id and canonical values. A side-b record
        whose reference is not linked yet waits (deferred)."""
        values = "".join(f", {q(c)}" for c in self.cols)
        waits = "AND NOT r.unresolved" if from_side == "b" else ""
        return f"""
            SELECT r.id AS source_id{values}
            FROM ({self._to_create(from_side)}) AS r
            WHERE r.error IS NULL {waits} {self.limited("r")}
        """

    def deferred(self) -> str:
        """Records waiting for a reference to be linked: pairs (their other fields still sync)
        and side-b records to create."""
        return f"""
            SELECT 'b' AS side, b_id AS id, '{DEFERRED_REASON}' AS reason
            FROM merged WHERE "a.unresolved" OR "b.unresolved"
            UNION ALL
            SELECT 'b' AS side, r.id, '{DEFERRED_REASON}' AS reason
            FROM ({self._to_create("b")}) AS r
            WHERE r.unresolved AND r.error IS NULL {self.limited("r")}
        """

    def failed(self) -> str:
        """Live records that cannot be read or converted, with why."""
        return """
            SELECT 'a' AS side, id, error AS reason FROM a WHERE error IS NOT NULL AND NOT deleted
            UNION ALL
            SELECT 'b' AS side, id, error AS reason FROM b WHERE error IS NOT NULL AND NOT deleted
        """

    def tombstones(self) -> str:
        """Rule 5: a link whose record is deleted (or gone) on a side is tombstoned."""
        return "SELECT a_id, b_id, deleted_side FROM known WHERE deleted_side IS NOT NULL"

    def deletes(self, side: str) -> str:
        """Delete propagation: the survivors of the links tombstoned by the other side."""
        other = "b" if side == "a" else "a"
        propagate = "true" if self.options.propagate_deletes else "false"
        return f"""
            SELECT {side}_id AS id FROM known WHERE deleted_side = '{other}' AND {propagate}
        """

    def copies(self) -> str:
        """With no link at all (a first sync, a lost state): records to create whose copy, every
        mapped value equal, is on the other side already."""
        if not self.cols or self.has_links:
            return "SELECT NULL::VARCHAR AS a_id, NULL::VARCHAR AS b_id WHERE false"
        equal = " AND ".join(f"x.{q(c)} IS NOT DISTINCT FROM y.{q(c)}" for c in self.cols)
        return f"""
            SELECT DISTINCT a_id, b_id FROM (
                SELECT x.id AS a_id, y.id AS b_id
                FROM ({self._to_create("a")}) AS x JOIN unlinked_b AS y ON {equal}
                UNION ALL
                SELECT x.id AS a_id, y.id AS b_id
                FROM unlinked_a AS x JOIN ({self._to_create("b")}) AS y ON {equal}
            )
        """

    def live_links(self) -> str:
        """How many links the run started with (the circuit breaker's denominator)."""
        return "SELECT count(*) FROM known"
