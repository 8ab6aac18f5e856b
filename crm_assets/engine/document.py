"""Reader for Sesam Talk dataflow documents (reStructuredText).

A document names two systems in its title and has one section per flow:
``<System A> <Entity A> to <System B> <Entity B>``, an optional merge block
(a two-column ``list-table``) and a three-column ``list-table`` of property
rows. Sections with the same title are one flow. Any malformed input raises
:class:`DocumentError` naming the line, so an operator can fix the document.

Pure Python on purpose: reading a document must not import Dagster.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Data type cells as written in documents, and the bare word they stand for.
DATA_TYPES: dict[str, str | None] = {
    '"string"': "string",
    '"integer"': "integer",
    '"float"': "float",
    '"boolean"': "boolean",
    "N/A": None,
}

_UNDERLINE = re.compile(r"^(=+|-+)\s*$")
_CONDITION = re.compile(
    r"^(?P<path>[^\s()]+)\s+\(Dependant on having (?P<value>[^\s()]+) in (?P<on>[^\s()]+)\)$"
)
_ROW_START = re.compile(r"^(?P<indent>\s+)\* - ?(?P<cell>.*)$")
_CELL_NEXT = re.compile(r"^(?P<indent>\s+)- ?(?P<cell>.*)$")
_OPTION = re.compile(r"^\s+:(?P<name>[\w-]+):\s*(?P<value>.*)$")


class DocumentError(ValueError):
    """A malformed dataflow document; the message names the file line."""

    def __init__(self, line: int, message: str, source: str = "document") -> None:
        self.line = line
        self.reason = message
        super().__init__(f"{source}, line {line}: {message}")


@dataclass(frozen=True)
class Condition:
    """Take the value from the array element whose ``path`` holds ``value``."""

    value: str
    path: str


@dataclass(frozen=True)
class PropertyRow:
    """One synchronized property: source path, target path, target data type."""

    source: str
    target: str
    type: str | None
    condition: Condition | None = None
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class MergeRow:
    """One alternative merge criterion: equal values link two records."""

    source: str
    target: str
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Endpoint:
    """A system and one of its entity types."""

    system: str
    entity: str


@dataclass(frozen=True)
class Flow:
    """One bidirectional flow: all same-titled sections of a document."""

    title: str
    source: Endpoint
    target: Endpoint
    merge: tuple[MergeRow, ...]
    properties: tuple[PropertyRow, ...]
    line: int = field(default=0, compare=False)

    @property
    def name(self) -> str:
        """A short identifier for asset keys and ``--flow``: ``contact_to_contacts``."""
        return slug(f"{self.source.entity} to {self.target.entity}")

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "source": {"system": self.source.system, "entity": self.source.entity},
            "target": {"system": self.target.system, "entity": self.target.entity},
            "merge": [{"source": m.source, "target": m.target} for m in self.merge],
            "properties": [
                {
                    "source": p.source,
                    "target": p.target,
                    "type": p.type,
                    "condition": (
                        None
                        if p.condition is None
                        else {"value": p.condition.value, "path": p.condition.path}
                    ),
                }
                for p in self.properties
            ],
        }


@dataclass(frozen=True)
class DataflowDocument:
    """A parsed dataflow document: its title, its two systems, its flows in order."""

    title: str
    systems: tuple[str, str]
    flows: tuple[Flow, ...]

    def flow(self, name: str) -> Flow:
        """The flow with this name or title."""
        for f in self.flows:
            if name in (f.name, f.title):
                return f
        known = ", ".join(f.name for f in self.flows)
        raise KeyError(f"no flow {name!r} in {self.title!r} (flows: {known})")

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "systems": list(self.systems),
            "flows": [f.to_json() for f in self.flows],
        }

    def summary(self) -> str:
        """A readable outline for people: flows, merge criteria, property rows."""
        out = [f"{self.title}  ({self.systems[0]} <-> {self.systems[1]})"]
        for f in self.flows:
            out.append("")
            out.append(f"{f.title}  [{f.name}]")
            for m in f.merge:
                out.append(f"  merge on  {m.source} = {m.target}")
            if not f.properties:
                out.append("  (no property rows)")
            for p in f.properties:
                cond = f"  if {p.condition.value} in {p.condition.path}" if p.condition else ""
                out.append(f"  {p.source} -> {p.target}  ({p.type or 'N/A'}){cond}")
        return "\n".join(out)


def slug(text: str) -> str:
    """Lower-case identifier made of ``[a-z0-9_]``, as Dagster names require."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def read_document(path: str | Path) -> DataflowDocument:
    """Read and parse a dataflow document file."""
    path = Path(path)
    return parse_document(path.read_bytes(), source=str(path))


def parse_document(data: bytes | str, source: str = "document") -> DataflowDocument:
    """Parse a dataflow document given as bytes or text (CRLF or LF line ends)."""
    return _Parser(_decode(data, source), source).parse()


def _decode(data: bytes | str, source: str) -> list[str]:
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise DocumentError(line, "not UTF-8 text (binary data?)", source) from None
    else:
        text = data.removeprefix("\ufeff")
    lines = [ln.removesuffix("\r") for ln in text.split("\n")]
    for number, ln in enumerate(lines, 1):
        if any(ord(ch) < 32 and ch != "\t" for ch in ln):
            raise DocumentError(number, "control characters in text (binary data?)", source)
    return lines


@dataclass
class _Section:
    title: str
    line: int
    body: list[tuple[int, str]]  # (line number, text)


@dataclass(frozen=True)
class _Cell:
    line: int
    text: str


@dataclass
class _Table:
    line: int
    intro: str  # the paragraph just before the directive
    rows: list[list[_Cell]]  # header rows first
    header_rows: int


class _Parser:
    def __init__(self, lines: list[str], source: str) -> None:
        self.lines = lines
        self.source = source

    def error(self, line: int, message: str) -> DocumentError:
        return DocumentError(line, message, self.source)

    def parse(self) -> DataflowDocument:
        title_line, title = self._title()
        systems = self._systems(title_line, title)
        flows: dict[str, Flow] = {}
        for section in self._sections(title_line):
            flow = self._flow(section, systems)
            if flow is None:
                continue
            known = flows.get(flow.title)
            flows[flow.title] = flow if known is None else self._union(known, flow)
        return DataflowDocument(title=title, systems=systems, flows=tuple(flows.values()))

    # -- document title -------------------------------------------------------------
    def _title(self) -> tuple[int, str]:
        numbered = [(i + 1, ln) for i, ln in enumerate(self.lines) if ln.strip()]
        if not numbered:
            raise self.error(1, "empty document: expected a title '<A> to <B> Dataflow'")
        idx = 0
        if _UNDERLINE.match(numbered[0][1]) and numbered[0][1].startswith("="):
            idx = 1  # overline
        if idx >= len(numbered):
            raise self.error(numbered[0][0], "document ends after the title overline")
        line, title = numbered[idx]
        under = numbered[idx + 1] if idx + 1 < len(numbered) else None
        if under is None or under[0] != line + 1 or not _UNDERLINE.match(under[1]):
            raise self.error(line, f"expected a document title underlined with '=', got {title!r}")
        return line, title.strip()

    def _systems(self, line: int, title: str) -> tuple[str, str]:
        m = re.fullmatch(r"(?P<a>.+?) to (?P<b>.+) Dataflow", title)
        if not m:
            raise self.error(
                line, f"title must read '<System A> to <System B> Dataflow', got {title!r}"
            )
        return m["a"].strip(), m["b"].strip()

    # -- sections ----------------------------------------------------------------------
    def _sections(self, title_line: int) -> list[_Section]:
        sections: list[_Section] = []
        start = title_line + 1  # index of the line after the title underline (0-based + 1)
        i = start
        while i < len(self.lines):
            text = self.lines[i]
            nxt = self.lines[i + 1] if i + 1 < len(self.lines) else ""
            is_header = (
                text.strip()
                and not text[0].isspace()
                and re.fullmatch(r"-{3,}\s*", nxt)
                and not _UNDERLINE.match(text)
            )
            if is_header:
                sections.append(_Section(title=text.strip(), line=i + 1, body=[]))
                i += 2
                continue
            if sections:
                sections[-1].body.append((i + 1, text))
            i += 1
        return sections

    def _split_title(self, title: str, systems: tuple[str, str]) -> tuple[Endpoint, Endpoint]:
        a, b = systems
        if not title.startswith(a + " "):
            raise ValueError
        rest = title[len(a) + 1 :]
        marker = f" to {b} "
        pos = rest.find(marker)
        if pos <= 0:
            raise ValueError
        entity_a, entity_b = rest[:pos].strip(), rest[pos + len(marker) :].strip()
        if not entity_a or not entity_b:
            raise ValueError
        return Endpoint(a, entity_a), Endpoint(b, entity_b)

    def _flow(self, section: _Section, systems: tuple[str, str]) -> Flow | None:
        tables = self._tables(section)
        try:
            source, target = self._split_title(section.title, systems)
        except ValueError:
            if tables:
                raise self.error(
                    section.line,
                    f"section {section.title!r} has a table but its title is not "
                    f"'{systems[0]} <Entity> to {systems[1]} <Entity>'",
                ) from None
            return None  # prose section such as "Introduction"
        merge: list[MergeRow] = []
        props: list[PropertyRow] = []
        seen_props = False
        for table in tables:
            if "will merge with" in table.intro:
                merge.extend(self._merge_rows(table))
            else:
                if seen_props:
                    raise self.error(table.line, "a second property table in one section")
                seen_props = True
                props.extend(self._property_rows(table))
        if not seen_props:
            raise self.error(
                section.line, f"section {section.title!r} has no property table (list-table)"
            )
        flow = Flow(section.title, source, target, (), (), line=section.line)
        return self._union(flow, Flow(section.title, source, target, tuple(merge), tuple(props)))

    def _tables(self, section: _Section) -> list[_Table]:
        tables: list[_Table] = []
        body = section.body
        paragraph: list[str] = []
        after_blank = False
        i = 0
        while i < len(body):
            number, text = body[i]
            if text.strip().startswith(".. list-table::"):
                table, i = self._table(body, i, " ".join(paragraph))
                tables.append(table)
                paragraph = []
                continue
            if text.strip().startswith(".."):
                raise self.error(number, f"unsupported directive {text.strip()!r}")
            if _ROW_START.match(text) or _CELL_NEXT.match(text):
                raise self.error(number, "table row outside a '.. list-table::' directive")
            if text.strip():
                # the intro is the last paragraph before a table
                paragraph = [*([] if after_blank else paragraph), text.strip()]
            after_blank = not text.strip()
            i += 1
        return tables

    def _table(self, body: list[tuple[int, str]], i: int, intro: str) -> tuple[_Table, int]:
        directive_line = body[i][0]
        i += 1
        header_rows = 0
        rows: list[list[_Cell]] = []
        while i < len(body):
            number, text = body[i]
            if not text.strip():
                i += 1
                continue
            if not text[0].isspace():
                break  # the table ends at the first unindented line
            option = _OPTION.match(text)
            if option and not rows:
                if option["name"] == "header-rows":
                    if not option["value"].isdigit():
                        raise self.error(number, f"header-rows must be a number: {text.strip()!r}")
                    header_rows = int(option["value"])
                i += 1
                continue
            start = _ROW_START.match(text)
            cell = _CELL_NEXT.match(text)
            if start:
                rows.append([_Cell(number, start["cell"].strip())])
            elif cell and rows:
                rows[-1].append(_Cell(number, cell["cell"].strip()))
            elif rows:
                last = rows[-1][-1]  # a cell's text continued on the next line
                rows[-1][-1] = _Cell(last.line, f"{last.text} {text.strip()}".strip())
            else:
                raise self.error(number, f"expected a table row '* - ...', got {text.strip()!r}")
            i += 1
        if header_rows > len(rows) or not rows:
            last = body[i - 1][0]
            raise self.error(
                last, f"truncated table: {header_rows} header row(s) declared, {len(rows)} found"
            )
        return _Table(directive_line, intro, rows, header_rows), i

    def _cells(self, table: _Table, width: int, meaning: str) -> list[list[_Cell]]:
        """The table's data rows, after checking every row (headers too) has ``width`` cells."""
        for row in table.rows:
            if len(row) != width:
                where = "truncated table: " if row is table.rows[-1] else ""
                raise self.error(
                    row[0].line, f"{where}row has {len(row)} cells, expected {width} ({meaning})"
                )
            for cell in row:
                if not cell.text:
                    raise self.error(cell.line, f"empty cell, expected {width} cells ({meaning})")
        return table.rows[table.header_rows :]

    def _merge_rows(self, table: _Table) -> list[MergeRow]:
        rows = self._cells(table, 2, "source property, target property")
        return [MergeRow(source.text, target.text, line=source.line) for source, target in rows]

    def _property_rows(self, table: _Table) -> list[PropertyRow]:
        rows = []
        meaning = "source property, target property, target data type"
        for source_cell, target_cell, type_cell in self._cells(table, 3, meaning):
            source, target, raw_type = source_cell.text, target_cell.text, type_cell.text
            if raw_type not in DATA_TYPES:
                raise self.error(
                    type_cell.line,
                    f"unknown data type {raw_type!r}; expected one of {', '.join(DATA_TYPES)}",
                )
            condition = None
            if "(" in source or ")" in source:
                m = _CONDITION.match(source)
                if not m:
                    raise self.error(
                        source_cell.line,
                        f"malformed condition in {source!r}; expected "
                        "'<path> (Dependant on having <value> in <path>)'",
                    )
                source, condition = m["path"], Condition(value=m["value"], path=m["on"])
            for cell, path in ((source_cell, source), (target_cell, target)):
                if not re.fullmatch(r"[\w$@-]+(\.[\w$@-]+)*", path):
                    raise self.error(cell.line, f"malformed property path {path!r}")
            line = source_cell.line
            rows.append(PropertyRow(source, target, DATA_TYPES[raw_type], condition, line=line))
        return rows

    def _union(self, first: Flow, second: Flow) -> Flow:
        """Same-titled sections are one flow: the ordered union of their rows."""
        props = {(p.source, p.target): p for p in first.properties}
        for p in second.properties:
            known = props.get((p.source, p.target))
            if known is None:
                props[(p.source, p.target)] = p
            elif known != p:
                raise self.error(
                    p.line,
                    f"{p.source} -> {p.target} declared twice with different types or "
                    f"conditions (first on line {known.line})",
                )
        merge = {(m.source, m.target): m for m in first.merge}
        for m in second.merge:
            merge.setdefault((m.source, m.target), m)
        return Flow(
            first.title,
            first.source,
            first.target,
            tuple(merge.values()),
            tuple(props.values()),
            line=first.line,
        )


def to_json_text(document: DataflowDocument) -> str:
    """The ``crm-assets spec --json`` output."""
    return json.dumps(document.to_json(), indent=2, ensure_ascii=False)
