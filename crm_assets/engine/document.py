"""Reader for Sesam Talk dataflow documents (reStructuredText).

A document names two systems in its title and has one section per flow:
``<System A> <Entity A> to <System B> <Entity B>``, an optional merge block
(a two-column ``list-table``) and a three-column ``list-table`` of property
rows. Sections with the same title are one flow. Any malformed input raises
:class:`DocumentError` naming the line, so an operator can fix the document.

Real Sesam Talk documents have quirks the reader accepts, each with a
:class:`DocumentWarning` (file and line) on :attr:`DataflowDocument.warnings`:

- a condition in the *target* cell is a condition on the target
  (:attr:`PropertyRow.condition_side` ``"target"``);
- a condition with an empty value or path, or several conditions run together in
  one cell, keeps its row but disables it (:attr:`PropertyRow.disabled` holds the
  reason; :attr:`Flow.enabled_properties` leaves such rows out);
- a title with a system missing (``Custom PMS to  Dataflow``): the system is read
  from the property tables' ``<System> Data Type`` headers (target side only) or,
  failing that, from the words every flow section title puts before its entity
  (two sections at least, none showing the empty name as a double space);
  otherwise it stays the empty string;
- a section title spelling a system with another case or spacing, or as a prefix
  (``Exact`` for ``Exact Online``): the endpoint carries the title's spelling, and
  sections naming the same two endpoints are one flow however they spell them.

Pure Python on purpose: reading a document must not import Dagster.
"""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
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
_CONDITIONAL_CELL = re.compile(r"(?P<path>[^\s()]+)\s*\((?P<body>[^()]*)\)")
_CONDITION_WORDS = "Dependant on having "
# one condition after its leading words: "<value> in <path>", either may be empty
_CONDITION_PART = re.compile(r"\s*(?P<value>[^\s()]*)\s+in(?:\s+(?P<on>[^\s()]*))?\s*")
_CONDITION_FORM = "'<path> (Dependant on having <value> in <path>)'"
_TITLE_FORM = "'<System A> to <System B> Dataflow'"
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
class DocumentWarning:
    """A quirk the reader accepted; ``message`` starts with the file and line."""

    line: int
    message: str


@dataclass(frozen=True)
class Condition:
    """Take the value from the array element whose ``path`` holds ``value``."""

    value: str
    path: str


@dataclass(frozen=True)
class PropertyRow:
    """One synchronized property: source path, target path, target data type.

    ``condition_side`` says which cell held the condition (``"source"`` or
    ``"target"``; None without one). ``disabled`` is the reason the row must not be
    synced (a condition with an empty value or path, conditions run together), None
    for an enabled row; a disabled row has no usable ``condition``.
    """

    source: str
    target: str
    type: str | None
    condition: Condition | None = None
    line: int = field(default=0, compare=False)
    condition_side: str | None = None
    disabled: str | None = None

    def __post_init__(self) -> None:
        if self.condition is not None and self.condition_side is None:
            object.__setattr__(self, "condition_side", "source")
        if self.condition_side not in (None, "source", "target"):
            raise ValueError(
                f"condition_side must be 'source' or 'target': {self.condition_side!r}"
            )


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
    #: the document's own name when several documents are synced together (their flow
    #: names may collide): it qualifies the flow's name
    namespace: str = ""

    @property
    def name(self) -> str:
        """A short identifier for asset keys and ``--flow``: ``contact_to_contacts``, or
        ``hubspot_crmoffice__contact_to_contacts`` in a namespace."""
        own = slug(f"{self.source.entity} to {self.target.entity}")
        return f"{self.namespace}__{own}" if self.namespace else own

    @property
    def enabled_properties(self) -> tuple[PropertyRow, ...]:
        """The rows to sync: ``properties`` without the disabled ones."""
        return tuple(p for p in self.properties if p.disabled is None)

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
                    "condition_side": p.condition_side,
                    "disabled": p.disabled is not None,
                    "disabled_reason": p.disabled,
                }
                for p in self.properties
            ],
        }


@dataclass(frozen=True)
class DataflowDocument:
    """A parsed dataflow document: its title, its two systems, its flows in order.

    ``source`` names where it was read from (a file path); ``warnings`` are the
    quirks the reader accepted, in line order. A system the title leaves out is the
    empty string unless the sections name it (see the module doc).
    """

    title: str
    systems: tuple[str, str]
    flows: tuple[Flow, ...]
    source: str = field(default="document", compare=False)
    warnings: tuple[DocumentWarning, ...] = field(default=(), compare=False)

    def in_namespace(self, namespace: str) -> DataflowDocument:
        """The document with every flow's name qualified by ``namespace``."""
        flows = tuple(replace(f, namespace=namespace) for f in self.flows)
        return replace(self, flows=flows)

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
            "warnings": [{"line": w.line, "message": w.message} for w in self.warnings],
        }

    def summary(self) -> str:
        """A readable outline for people: flows, merge criteria, property rows."""
        a, b = (s or "(unnamed)" for s in self.systems)
        out = [f"{self.title}  ({a} <-> {b})"]
        for f in self.flows:
            out.append("")
            out.append(f"{f.title}  [{f.name}]")
            for m in f.merge:
                out.append(f"  merge on  {m.source} = {m.target}")
            if not f.properties:
                out.append("  (no property rows)")
            for p in f.properties:
                cond = ""
                if p.condition:
                    side = "" if p.condition_side == "source" else f" (on the {p.condition_side})"
                    cond = f"  if {p.condition.value} in {p.condition.path}{side}"
                off = f"  DISABLED: {p.disabled}" if p.disabled else ""
                out.append(f"  {p.source} -> {p.target}  ({p.type or 'N/A'}){cond}{off}")
        return "\n".join(out)


def _norm(name: str) -> str:
    """A system name for comparison: no case, no whitespace."""
    return "".join(name.split()).casefold()


def _quote(text: str, limit: int = 80) -> str:
    """A cell quoted for a message, cut short: messages never carry more than a cell."""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _match_system(words: list[str], system: str) -> tuple[int, bool] | None:
    """How many of ``words`` spell ``system`` (ignoring case and spacing), and whether
    exactly (False: an abbreviation, a prefix of the name). At least one word is left
    for the entity; the exact spelling wins over a prefix, a longer prefix over a shorter.
    """
    want = _norm(system)
    if not want:
        return (0, True) if words else None
    best = None
    for count in range(1, len(words)):
        got = _norm(" ".join(words[:count]))
        if got == want:
            return count, True
        if not want.startswith(got):
            break
        best = (count, False)
    return best


def slug(text: str) -> str:
    """Lower-case identifier made of ``[a-z0-9_]``, as Dagster names require."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def read_document(path: str | Path) -> DataflowDocument:
    """Read and parse a dataflow document file."""
    path = Path(path)
    return parse_document(path.read_bytes(), source=str(path))


class SelectionError(ValueError):
    """Documents that cannot be synced together (one line naming them)."""


def document_files(paths: Sequence[Path]) -> list[Path]:
    """The files a list of documents and folders names: a folder stands for every ``.rst``
    in it (sorted, so flows keep their order); a file named twice counts once."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.rst"))
            if not found:
                raise FileNotFoundError(errno.ENOENT, "no .rst document in this folder", str(path))
            files += found
        else:
            files.append(path)
    return list(dict.fromkeys(files))


def read_documents(paths: Sequence[Path]) -> tuple[DataflowDocument, ...]:
    """Read several documents to sync together: with more than one, each document's flow
    names are qualified by its file name, since two documents may both hold, say, a
    ``contact_to_contacts`` flow; a single document keeps its flows' plain names."""
    files = document_files(paths)
    documents = tuple(read_document(f) for f in files)
    if len(documents) == 1:
        return documents
    namespaces: dict[str, Path] = {}
    for file in files:
        other = namespaces.setdefault(slug(file.stem), file)
        if other != file:
            raise SelectionError(f"{other} and {file} have the same name: rename one")
    return tuple(d.in_namespace(n) for d, n in zip(documents, namespaces, strict=True))


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
        self.warnings: list[DocumentWarning] = []

    def error(self, line: int, message: str) -> DocumentError:
        return DocumentError(line, message, self.source)

    def warn(self, line: int, message: str) -> None:
        self.warnings.append(DocumentWarning(line, f"{self.source}, line {line}: {message}"))

    def parse(self) -> DataflowDocument:
        title_line, title = self._title()
        systems = self._systems(title_line, title)
        sections = self._sections(title_line)
        if not all(systems):
            systems = self._missing_system(title_line, systems, sections)
        # keyed by endpoints: same-titled sections are one flow, and so are titles
        # that differ only in how they spell a system
        flows: dict[tuple[Endpoint, Endpoint], Flow] = {}
        for section in sections:
            flow = self._flow(section, systems)
            if flow is None:
                continue
            key = (flow.source, flow.target)
            known = flows.get(key)
            flows[key] = flow if known is None else self._union(known, flow)
        return DataflowDocument(
            title=title,
            systems=systems,
            flows=tuple(flows.values()),
            source=self.source,
            warnings=tuple(sorted(self.warnings, key=lambda w: w.line)),
        )

    # -- document title -------------------------------------------------------------
    def _title(self) -> tuple[int, str]:
        numbered = [(i + 1, ln) for i, ln in enumerate(self.lines) if ln.strip()]
        if not numbered:
            raise self.error(1, f"empty document: expected a title {_TITLE_FORM}")
        idx = 0
        if _UNDERLINE.match(numbered[0][1]) and numbered[0][1].startswith("="):
            idx = 1  # overline
        if idx >= len(numbered):
            raise self.error(numbered[0][0], "document ends after the title overline")
        line, title = numbered[idx]
        under = numbered[idx + 1] if idx + 1 < len(numbered) else None
        if under is None or under[0] != line + 1 or not _UNDERLINE.match(under[1]):
            # the line is not quoted: the file may be anything but a dataflow document
            raise self.error(line, "no document title ('<A> to <B> Dataflow' underlined)")
        return line, title.strip()

    def _systems(self, line: int, title: str) -> tuple[str, str]:
        m = re.fullmatch(r"(?:(?P<a>.*?)\s+)?to(?:\s+(?P<b>.*?))?\s+Dataflow", title)
        if not m:
            raise self.error(line, f"the title does not read {_TITLE_FORM}")
        a, b = (m["a"] or "").strip(), (m["b"] or "").strip()
        if not a and not b:
            raise self.error(line, f"the title names no system: expected {_TITLE_FORM}")
        return a, b

    def _missing_system(
        self, line: int, systems: tuple[str, str], sections: list[_Section]
    ) -> tuple[str, str]:
        """The title leaves a system out: infer it from the sections if they agree."""
        missing = 0 if not systems[0] else 1
        role = ("source", "target")[missing]
        name, how = self._infer_system(missing, systems[1 - missing], sections)
        if name:
            self.warn(line, f"the title names no {role} system; read it as {name!r} ({how})")
        else:
            self.warn(
                line,
                f"the title names no {role} system; it is left empty "
                "(the sections do not name it either)",
            )
        return (name, systems[1]) if missing == 0 else (systems[0], name)

    def _infer_system(self, missing: int, known: str, sections: list[_Section]) -> tuple[str, str]:
        """``(name, how it was found)`` for the system on side ``missing``, or ``("", "")``.

        Sources, in order: the property tables' ``<System> Data Type`` header (for a
        missing target), then the words every flow section title puts before its
        entity on that side (two sections at least). A section showing the empty
        name (``to  Orders``, two spaces) means the generator had no name: none.
        """
        sides: list[list[str]] = []
        headers: set[str] = set()
        for section in sections:
            tables = self._tables(section)
            if not tables:
                continue
            words = section.title.split()
            for k, word in enumerate(words):
                known_side, other = words[k + 1 :], words[:k]
                if missing == 1:
                    known_side, other = other, known_side
                if word == "to" and other and _match_system(known_side, known):
                    sides.append(other)
                    break
            else:
                continue
            if missing == 1:
                if re.search(r"(?:^|\s)to\s\s", section.title):
                    return "", ""
                for table in tables:
                    if "will merge with" in table.intro or not table.header_rows:
                        continue
                    if len(table.rows[0]) == 3:
                        headers.add(re.sub(r"\s*Data Type$", "", table.rows[0][2].text).strip())
        if not sides:
            return "", ""
        if len(headers) == 1:
            name = headers.pop()
            if name and all(
                _match_system(side, name) == (len(name.split()), True) for side in sides
            ):
                return name, "from the property tables' data type headers"
        if len(sides) < 2:
            return "", ""
        count = 0
        while all(len(side) > count + 1 for side in sides) and len({s[count] for s in sides}) == 1:
            count += 1
        if not count:
            return "", ""
        return " ".join(sides[0][:count]), "from the section titles"

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

    def _split_title(
        self, title: str, systems: tuple[str, str]
    ) -> tuple[Endpoint, Endpoint, tuple[str, str]]:
        """Both endpoints of a section title, and how the title spelled each system.

        Systems compare ignoring case and spacing; a prefix of the name (``Exact``
        for ``Exact Online``) is the system too. Exact spellings win when the title
        has several ``to`` words. ValueError: not a flow title.
        """
        words = title.split()
        best: tuple[int, int, int, int] | None = None  # score, k, words of a, words of b
        for k, word in enumerate(words):
            if word != "to":
                continue
            a = _match_system(words[:k], systems[0])
            b = _match_system(words[k + 1 :], systems[1])
            if a is None or b is None:
                continue
            score = a[1] + b[1]
            if best is None or score > best[0]:
                best = (score, k, a[0], b[0])
        if best is None:
            raise ValueError
        _, k, count_a, count_b = best
        left, right = words[:k], words[k + 1 :]
        return (
            Endpoint(systems[0], " ".join(left[count_a:])),
            Endpoint(systems[1], " ".join(right[count_b:])),
            (" ".join(left[:count_a]), " ".join(right[:count_b])),
        )

    def _flow(self, section: _Section, systems: tuple[str, str]) -> Flow | None:
        tables = self._tables(section)
        try:
            source, target, spelled = self._split_title(section.title, systems)
        except ValueError:
            if tables:
                raise self.error(
                    section.line,
                    f"section {_quote(section.title)} has a table but its title is not "
                    f"'{systems[0]} <Entity> to {systems[1]} <Entity>'",
                ) from None
            return None  # prose section such as "Introduction"
        for system, written in zip(systems, spelled, strict=True):
            if written != system:
                self.warn(
                    section.line,
                    f"section title spells the system {written!r} where the document "
                    f"title has {system!r}; read as {system!r}",
                )
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
                section.line, f"section {_quote(section.title)} has no property table (list-table)"
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
                raise self.error(number, f"unsupported directive {_quote(text.strip())}")
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
                        raise self.error(
                            number, f"header-rows must be a number: {_quote(option['value'])}"
                        )
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
                raise self.error(
                    number, f"expected a table row '* - ...', got {_quote(text.strip())}"
                )
            i += 1
        if header_rows > len(rows) or not rows:
            last = next(n for n, t in reversed(body[:i]) if t.strip())  # the directive at least
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

    def _conditional(self, cell: _Cell) -> tuple[str, Condition | None, str | None]:
        """A property cell read as ``(path, condition, disabled reason)``.

        A condition with an empty value or path, or several run together, is no
        usable condition: the reason says why the row is disabled. Anything in
        parentheses that is not ``(Dependant on having <value> in <path>)`` is an error.
        """
        text = cell.text
        if "(" not in text and ")" not in text:
            return text, None, None
        m = _CONDITIONAL_CELL.fullmatch(text)
        body = m["body"].strip() if m else ""
        parts = body.split(_CONDITION_WORDS)[1:] if body.startswith(_CONDITION_WORDS) else []
        found = [_CONDITION_PART.fullmatch(part) for part in parts]
        if m is None or not found or not all(found):
            raise self.error(
                cell.line, f"malformed condition in {_quote(text)}; expected {_CONDITION_FORM}"
            )
        path = m["path"]
        if len(found) > 1:
            return path, None, f"{len(found)} conditions run together in {_quote(text)}"
        (part,) = found
        assert part is not None
        value, on = part["value"], part["on"] or ""
        if not value or not on:
            empty = " and ".join(w for w, v in (("value", value), ("path", on)) if not v)
            return path, None, f"condition with an empty {empty} in {_quote(text)}"
        return path, Condition(value=value, path=on), None

    def _property_rows(self, table: _Table) -> list[PropertyRow]:
        rows = []
        meaning = "source property, target property, target data type"
        for source_cell, target_cell, type_cell in self._cells(table, 3, meaning):
            raw_type = type_cell.text
            if raw_type not in DATA_TYPES:
                raise self.error(
                    type_cell.line,
                    f"unknown data type {_quote(raw_type)}; expected one of {', '.join(DATA_TYPES)}",
                )
            source, source_cond, source_off = self._conditional(source_cell)
            target, target_cond, target_off = self._conditional(target_cell)
            for cell, path in ((source_cell, source), (target_cell, target)):
                if not re.fullmatch(r"[\w$@-]+(\.[\w$@-]+)*", path):
                    raise self.error(cell.line, f"malformed property path {_quote(path)}")
            condition, side, disabled = source_cond, None, source_off
            if source_cond or source_off:
                side = "source"
            if target_cond or target_off:
                if side:
                    disabled = "conditions on both the source and the target cell"
                    condition = None
                    self.warn(target_cell.line, f"{disabled}: the row is kept but disabled")
                else:
                    condition, side, disabled = target_cond, "target", target_off
                    if target_cond:
                        self.warn(
                            target_cell.line,
                            f"condition in the target cell {_quote(target_cell.text)}: "
                            f"read as a condition on the target {target!r}",
                        )
            if disabled and disabled == (source_off or target_off):
                where = source_cell if source_off else target_cell
                self.warn(where.line, f"{disabled}: the row is kept but disabled")
            rows.append(
                PropertyRow(
                    source,
                    target,
                    DATA_TYPES[raw_type],
                    condition,
                    line=source_cell.line,
                    condition_side=side,
                    disabled=disabled,
                )
            )
        return rows

    def _union(self, first: Flow, second: Flow) -> Flow:
        """Same-titled sections are one flow: the ordered union of their rows.

        Disabled rows never clash with enabled ones (they are not synced); a
        disabled row repeated word for word is one row.
        """

        def key(p: PropertyRow) -> tuple[str, ...]:
            return (p.source, p.target) if p.disabled is None else (p.source, p.target, p.disabled)

        props = {key(p): p for p in first.properties}
        for p in second.properties:
            known = props.get(key(p))
            if known is None:
                props[key(p)] = p
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


def to_json_text(documents: Sequence[DataflowDocument]) -> str:
    """The ``crm-assets spec --json`` output: one document's object, or a list of several."""
    data = [d.to_json() for d in documents]
    return json.dumps(data[0] if len(data) == 1 else data, indent=2, ensure_ascii=False)
