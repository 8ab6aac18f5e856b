"""Mapping: both sides of a flow projected onto the flow's properties, typed per the document.

Side ``a`` is the document's source system (Custom CRM), side ``b`` its target
(CRMOffice). Every property row becomes one *canonical* column, named after
the target path and typed per the target data type, so both sides compare
value for value. References (``ProductId`` ↔ ``company.id``) are canonical in
side-a ids: side-b values are translated through the referenced flow's links.
All of it is whole-frame polars expressions.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import polars as pl

from crm_assets.engine.document import DataflowDocument, Endpoint, Flow
from crm_assets.engine.objects import SourceObject
from crm_assets.engine.snapshot import DELETED, ERROR, FIELD_DTYPES, SEQ

#: canonical dtype per document data type (``None`` is N/A: compared as text)
CANONICAL: dict[str | None, pl.DataType] = {
    "string": pl.String(),
    "integer": pl.Int64(),
    "float": pl.Float64(),
    "boolean": pl.Boolean(),
    None: pl.String(),
}


#: How :func:`map_side` maps values: raised whenever the same record maps differently (2:
#: merge keys strip the ASCII information separators), so frames mapped before are not
#: reused and plans made before are not built on.
MAPPED_FORMAT = 2

#: The columns every mapped frame has besides the canonical ones.
META = ("id", "modified", "created", "version", "deleted", "error", "unresolved")


class MappingError(ValueError):
    """The document asks for a mapping the objects cannot provide."""


@dataclass(frozen=True)
class Column:
    """One property row as a canonical column."""

    name: str  # the target path
    a_field: str
    b_field: str
    type: str | None
    reference: str | None = None  # the flow whose links translate the value

    @property
    def dtype(self) -> pl.DataType:
        return CANONICAL[self.type]


@dataclass(frozen=True)
class FlowMapping:
    """A flow with its two objects and canonical columns."""

    name: str
    title: str
    a: SourceObject
    b: SourceObject
    columns: tuple[Column, ...]
    merge: tuple[tuple[str, str], ...]  # (a field, b field) alternatives

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def dtypes(self) -> dict[str, pl.DataType]:
        """Each canonical column's type (base values are read back as these)."""
        return {c.name: c.dtype for c in self.columns}

    @property
    def key_columns(self) -> frozenset[str]:
        """The canonical columns that are merge keys: compared in canonical form, so two
        spellings of one key never overwrite each other."""
        merge = set(self.merge)
        return frozenset(c.name for c in self.columns if (c.a_field, c.b_field) in merge)

    @property
    def references(self) -> list[str]:
        """The flows this flow's references are translated through (they run first)."""
        return sorted({c.reference for c in self.columns if c.reference})

    def side(self, side: str) -> SourceObject:
        return self.a if side == "a" else self.b


#: Finds the object one end of a flow stands for (raises when no connector provides it).
Resolver = Callable[[Flow, Endpoint], SourceObject]


def build_flow_mapping(document: DataflowDocument, flow: Flow, resolve: Resolver) -> FlowMapping:
    """Check a flow against its objects' fields and resolve its references."""
    a = resolve(flow, flow.source)
    b = resolve(flow, flow.target)
    columns: list[Column] = []
    for row in flow.enabled_properties:  # a disabled row (broken condition) is never synced
        if row.condition is not None:
            raise MappingError(
                f"line {row.line}: conditional row {row.source!r}: {a.system} {a.obj} has no arrays"
            )
        for obj, path in ((a, row.source), (b, row.target)):
            if path not in obj.fields:
                raise MappingError(f"line {row.line}: {obj.system} {obj.obj} has no field {path!r}")
        reference = None
        if row.source in a.references or row.target in b.references:
            reference = _referenced_flow(document, flow, row.source, row.target, a, b, resolve)
        if any(c.name == row.target for c in columns):
            raise MappingError(f"line {row.line}: {row.target!r} is the target of two rows")
        columns.append(Column(row.target, row.source, row.target, row.type, reference))
    for m in flow.merge:
        for obj, path in ((a, m.source), (b, m.target)):
            if path not in obj.fields:
                raise MappingError(f"line {m.line}: {obj.system} {obj.obj} has no field {path!r}")
    merge = tuple((m.source, m.target) for m in flow.merge)
    return FlowMapping(flow.name, flow.title, a, b, tuple(columns), merge)


def _referenced_flow(
    document: DataflowDocument,
    flow: Flow,
    a_field: str,
    b_field: str,
    a: SourceObject,
    b: SourceObject,
    resolve: Resolver,
) -> str:
    target = (a.references.get(a_field), b.references.get(b_field))
    for other in document.flows:
        if other.name == flow.name:
            continue
        try:
            oa, ob = resolve(other, other.source), resolve(other, other.target)
        except ValueError:
            continue  # a flow no connector provides translates nothing
        if (oa.system_key, oa.obj, ob.system_key, ob.obj) == (
            a.system_key,
            target[0],
            b.system_key,
            target[1],
        ):
            return other.name
    raise MappingError(
        f"line {flow.line}: {a_field} -> {b_field} is a reference, but no flow links "
        f"{a.system} {target[0]} with {b.system} {target[1]}"
    )


#: Every Unicode space (as ``str.isspace`` has them: the information separators too) and
#: invisible formatting character (no-break and zero-width spaces, byte order marks, soft
#: hyphens): none of them is part of a key.
_INVISIBLE = r"[\s\x1c-\x1f\p{Cf}]"
#: The ASCII characters ``_INVISIBLE`` matches.
_ASCII_SPACE = r"[\t-\r\x1c-\x1f ]"


def canonical_key(expr: pl.Expr) -> pl.Expr:
    """A merge-key value as keys compare (DESIGN 5.1): Unicode NFC, case-folded, every space
    and invisible character stripped; empty is no key. ``Åse@x.no`` composed or decomposed,
    padded with a no-break space or a zero-width one, upper or lower case: one key.

    Pure-ASCII values (nearly every key) are already NFC and hold no invisible character
    but ASCII spaces, so they skip the Unicode work, which costs six times as much; the
    others get it (the full branch sees nulls in place of ASCII values)."""
    value = expr.cast(pl.String)
    is_ascii = value.str.len_bytes() == value.str.len_chars()
    ascii_text = value.str.to_lowercase().str.replace_all(_ASCII_SPACE, "")
    unicode_text = (
        pl.when(~is_ascii)
        .then(value)
        .str.normalize("NFC")
        .str.to_lowercase()
        .str.replace_all("ß", "ss", literal=True)  # full case folding where lowercasing differs
        .str.replace_all(_INVISIBLE, "")
    )
    text = pl.when(is_ascii).then(ascii_text).otherwise(unicode_text)
    return pl.when(text == "").then(None).otherwise(text)


def canonical_text(value: object) -> str | None:
    """One key value in canonical form, as :func:`canonical_key` makes it for whole columns."""
    if value is None:
        return None
    text = unicodedata.normalize("NFC", str(value)).lower().replace("ß", "ss")
    text = "".join(ch for ch in text if not (ch.isspace() or unicodedata.category(ch) == "Cf"))
    return text or None


def convert(expr: pl.Expr, source: pl.DataType, target: pl.DataType) -> pl.Expr:
    """A value of one type as another; what cannot convert becomes null (checked by the caller)."""
    if source == target:
        out = expr
    elif target == pl.Boolean() and source == pl.String():
        text = expr.str.strip_chars().str.to_lowercase()
        out = (
            pl.when(text.is_in(["true", "1", "yes"]))
            .then(True)
            .when(text.is_in(["false", "0", "no"]))
            .then(False)
            .otherwise(None)
        )
    elif source == pl.String():
        out = expr.str.strip_chars().cast(target, strict=False)
    else:
        out = expr.cast(target, strict=False)
    if target == pl.String():
        out = pl.when(out.str.strip_chars() == "").then(None).otherwise(out)
    return out


def _can_fail(source: pl.DataType, target: pl.DataType) -> bool:
    """Whether converting can lose a value (anything converts to text)."""
    return source != target and target != pl.String()


def _conversion_errors(checks: list[tuple[str, pl.Expr, pl.Expr, str]]) -> pl.Expr:
    """A message listing every field whose value did not convert, or null."""
    parts = [
        pl.when(raw.is_not_null() & converted.is_null())
        .then(
            pl.format(
                "{}: cannot convert {} to {}", pl.lit(name), raw.cast(pl.String), pl.lit(kind)
            )
        )
        .otherwise(None)
        for name, raw, converted, kind in checks
    ]
    if not parts:
        return pl.lit(None, dtype=pl.String)
    joined = pl.concat_str(parts, separator="; ", ignore_nulls=True)
    return pl.when(joined == "").then(None).otherwise(joined)


def map_side(
    snapshot: pl.DataFrame,
    mapping: FlowMapping,
    side: str,
    reference_links: Mapping[str, pl.DataFrame] | None = None,
) -> pl.DataFrame:
    """One side's snapshot as the flow's canonical frame.

    ``reference_links`` holds, per referenced flow, its live links (``a_id``,
    ``b_id``); side-b references translate through them, and one that does not
    translate is flagged ``unresolved`` (the record waits, it is not dropped).
    """
    obj = mapping.side(side)
    frame = snapshot.lazy()
    exprs: list[pl.Expr] = [
        pl.col(obj.id_field).cast(pl.String).alias("id"),
        pl.col(obj.modified_field).alias("modified"),
        pl.col(obj.created_field).alias("created"),
        pl.col(obj.version_field).cast(pl.String).alias("version"),
        pl.col(DELETED).alias("deleted"),
        (pl.col(SEQ) if SEQ in snapshot.columns else pl.lit(0, dtype=pl.Int64)).alias("seq"),
    ]
    checks = []
    unresolved: list[pl.Expr] = []
    for column in mapping.columns:
        field = column.a_field if side == "a" else column.b_field
        raw = pl.col(field)
        converted = convert(raw, FIELD_DTYPES[obj.fields[field]], column.dtype)
        if column.reference and side == "b":
            links = (reference_links or {}).get(column.reference)
            if links is None:
                raise MappingError(f"flow {mapping.name}: links of {column.reference} not given")
            lookup = links.select(
                pl.col("b_id").alias(f"__ref_{column.name}"),
                pl.col("a_id").alias(f"__refa_{column.name}"),
            )
            frame = frame.join(
                lookup.lazy(),
                left_on=raw.cast(pl.String),
                right_on=f"__ref_{column.name}",
                how="left",
                maintain_order="left",
            )
            translated = pl.col(f"__refa_{column.name}")
            unresolved.append(raw.is_not_null() & translated.is_null())
            exprs.append(translated.alias(column.name))
            continue
        if _can_fail(FIELD_DTYPES[obj.fields[field]], column.dtype):
            checks.append((field, raw, converted, column.type or "text"))
        exprs.append(converted.alias(column.name))
    for i, (a_field, b_field) in enumerate(mapping.merge):
        field = a_field if side == "a" else b_field
        exprs.append(canonical_key(pl.col(field)).alias(f"key{i}"))
    unreadable = pl.col(ERROR) if ERROR in snapshot.columns else pl.lit(None, dtype=pl.String)
    errors = pl.concat_str(
        [unreadable, _conversion_errors(checks)], separator="; ", ignore_nulls=True
    )
    exprs.append(pl.when(errors != "").then(errors).alias("error"))
    exprs.append(
        pl.any_horizontal(unresolved).fill_null(False).alias("unresolved")
        if unresolved
        else pl.lit(False).alias("unresolved")
    )
    return frame.select(exprs).collect()


def to_side(
    values: pl.DataFrame,
    mapping: FlowMapping,
    side: str,
    reference_links: Mapping[str, pl.DataFrame] | None = None,
) -> pl.DataFrame:
    """Canonical values as one side's field values, for a write.

    Returns the side's fields (one column per mapped field) plus ``error`` (a
    value the side cannot hold, e.g. a non-numeric ``orgNr`` for the integer
    ``ProductNumber``) and ``unresolved`` (a reference not linked yet).
    """
    obj = mapping.side(side)
    frame = values.lazy()
    exprs: list[pl.Expr] = []
    checks = []
    unresolved: list[pl.Expr] = []
    for column in mapping.columns:
        field = column.a_field if side == "a" else column.b_field
        value = pl.col(column.name)
        if column.reference and side == "b":
            links = (reference_links or {})[column.reference]
            lookup = links.select(
                pl.col("a_id").alias(f"__refa_{column.name}"),
                pl.col("b_id").alias(f"__refb_{column.name}"),
            )
            frame = frame.join(
                lookup.lazy(),
                left_on=value,
                right_on=f"__refa_{column.name}",
                how="left",
                maintain_order="left",
            )
            translated = pl.col(f"__refb_{column.name}")
            unresolved.append(value.is_not_null() & translated.is_null())
            exprs.append(translated.alias(field))
            continue
        converted = convert(value, column.dtype, FIELD_DTYPES[obj.fields[field]])
        if _can_fail(column.dtype, FIELD_DTYPES[obj.fields[field]]):
            checks.append((column.name, value, converted, obj.fields[field]))
        exprs.append(converted.alias(field))
    exprs.append(_conversion_errors(checks).alias("error"))
    exprs.append(
        pl.any_horizontal(unresolved).fill_null(False).alias("unresolved")
        if unresolved
        else pl.lit(False).alias("unresolved")
    )
    keep = [c for c in values.columns if c not in mapping.names]
    return frame.select([pl.col(keep), *exprs]).collect()
