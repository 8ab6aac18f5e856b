"""The reader accepts the quirks of real Sesam Talk documents, each with a warning naming
file and line; truly malformed input still fails with a DocumentError."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crm_assets.engine.document import (
    Condition,
    DataflowDocument,
    DocumentError,
    DocumentWarning,
    PropertyRow,
    parse_document,
    read_document,
)

FIXTURES = Path(__file__).parent / "fixtures" / "specs"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "specs"

# The quirks, verbatim as real documents have them.
TARGET_CONDITION = "phone_numbers.number (Dependant on having wd:Q67372736 in phone_numbers.name)"
EMPTY_PATH = "department.id (Dependant on having wd:Q29415492 in  )"
EMPTY_VALUE = "OrgNr (Dependant on having  in Country.TwoLetterISOCountry)"
RUN_TOGETHER = "OrganizationNumber (Dependant on having NO in MailAddress.CountryCodeDependant on having wd:Q11994066 in MailAddress.CountryCode)"
MISSING_SYSTEM_TITLE = "Custom PMS to  Dataflow"


def document(title: str, *sections: str) -> str:
    bar = "=" * len(title)
    return f"{bar}\n{title}\n{bar}\n\nGenerated: 2024-11-13 00:00:23\n\n" + "\n".join(sections)


def section(
    title: str, *rows: tuple[str, str, str], data_type: str = "Data Type", merge: bool = False
) -> str:
    out = [title, "-" * len(title), ""]
    if merge:
        out += [
            "A thing will merge with a thing if one of the following property combinations match:",
            "",
            ".. list-table::",
            "   :header-rows: 1",
            "",
            "   * - h",
            "     - h",
            "   * - mail",
            "     - email",
            "",
        ]
    out += [
        "The following properties are synchronized:",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "",
        "   * - h",
        "     - h",
        f"     - {data_type}",
    ]
    for source, target, type_ in rows:
        out += [f"   * - {source}", f"     - {target}", f"     - {type_}"]
    return "\n".join(out) + "\n"


def line_of(text: str, needle: str) -> int:
    """The number of the only line holding ``needle``."""
    (line,) = [i for i, ln in enumerate(text.splitlines(), 1) if needle in ln]
    return line


def only_warning(doc: DataflowDocument) -> DocumentWarning:
    assert len(doc.warnings) == 1, doc.warnings
    return doc.warnings[0]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crm_assets.cli", "spec", *args],
        capture_output=True,
        text=True,
        check=False,
    )


# -- 1. a condition in the target cell ----------------------------------------------------


def test_condition_in_the_target_cell_is_a_target_condition():
    text = document(
        "Freshteam to CRMOffice Dataflow",
        section(
            "Freshteam Employee to CRMOffice Contacts",
            ("first_name", "givenName", '"string"'),
            ("mobile", TARGET_CONDITION, '"string"'),
        ),
    )
    doc = parse_document(text, source="x.rst")
    plain, row = doc.flows[0].properties
    assert (plain.condition, plain.condition_side, plain.disabled) == (None, None, None)
    assert (row.source, row.target, row.type) == ("mobile", "phone_numbers.number", "string")
    assert row.condition == Condition("wd:Q67372736", "phone_numbers.name")
    assert row.condition_side == "target"
    assert row.disabled is None
    assert doc.flows[0].enabled_properties == (plain, row)
    warning = only_warning(doc)
    assert warning.line == line_of(text, TARGET_CONDITION)
    assert warning.message.startswith(f"x.rst, line {warning.line}: condition in the target cell")
    prop = doc.to_json()["flows"][0]["properties"][1]
    assert prop["condition"] == {"value": "wd:Q67372736", "path": "phone_numbers.name"}
    assert (prop["condition_side"], prop["disabled"], prop["disabled_reason"]) == (
        "target",
        False,
        None,
    )


def test_a_source_condition_stays_a_source_condition_without_warning():
    text = (FIXTURES / "freshteam-crmoffice.rst").read_text()
    doc = parse_document(text, source="freshteam.rst")
    assert doc.warnings == ()
    assert [p.condition_side for p in doc.flows[0].properties] == [None, None, "source", "source"]
    # rows built by hand say the same as parsed ones
    assert doc.flows[0].properties[3] == PropertyRow(
        "phone_numbers.number",
        "mobilePhone",
        "string",
        Condition("wd:Q17517", "phone_numbers.name"),
    )


# -- 2. unusable conditions: the row is kept, disabled ------------------------------------


@pytest.mark.parametrize(
    ("source", "target", "cell", "reason"),
    [
        ("department", EMPTY_PATH, EMPTY_PATH, "condition with an empty path"),
        (EMPTY_VALUE, "orgNr", EMPTY_VALUE, "condition with an empty value"),
        (RUN_TOGETHER, "orgNo", "MailAddress.CountryCodeDependant", "2 conditions run together"),
    ],
    ids=["empty-path", "empty-value", "run-together"],
)
def test_unusable_condition_disables_the_row(source, target, cell, reason):
    text = document(
        "PowerOffice to CRMOffice Dataflow",
        section(
            "PowerOffice Customer to CRMOffice Companies",
            ("Name", "name", '"string"'),
            (source, target, '"string"'),
        ),
    )
    doc = parse_document(text, source="bad.rst")
    (flow,) = doc.flows
    name, row = flow.properties
    assert row.disabled is not None and row.disabled.startswith(reason)
    assert row.condition is None
    assert row.condition_side == ("target" if source == "department" else "source")
    assert (row.source, row.target) == (
        source.split(" ")[0],
        target.split(" ")[0],
    )
    assert flow.enabled_properties == (name,)
    warning = only_warning(doc)
    assert warning.line == line_of(text, cell)
    assert warning.message.startswith(f"bad.rst, line {warning.line}: {reason}")
    assert "disabled" in warning.message
    prop = doc.to_json()["flows"][0]["properties"][1]
    assert prop["disabled"] is True
    assert prop["disabled_reason"] == row.disabled
    assert prop["condition"] is None
    assert "DISABLED" in doc.summary()


def test_disabled_row_does_not_clash_with_the_enabled_row_of_the_same_pair():
    text = document(
        "PowerOffice to CRMOffice Dataflow",
        section(
            "PowerOffice Customer to CRMOffice Companies",
            ("OrgNr", "orgNr", '"string"'),
            (EMPTY_VALUE, "orgNr", '"string"'),
        ),
        # the same section again, word for word: one flow, no duplicate rows
        section(
            "PowerOffice Customer to CRMOffice Companies",
            ("OrgNr", "orgNr", '"string"'),
            (EMPTY_VALUE, "orgNr", '"string"'),
        ),
    )
    doc = parse_document(text, source="x.rst")
    (flow,) = doc.flows
    assert [p.disabled is None for p in flow.properties] == [True, False]
    assert len(flow.enabled_properties) == 1
    assert len(doc.warnings) == 2  # one per section, each naming its own line
    assert doc.warnings[0].line < doc.warnings[1].line


# -- 3. a title with a system missing -----------------------------------------------------


def test_title_with_a_system_missing_reads_it_from_the_data_type_header():
    text = document(
        MISSING_SYSTEM_TITLE,
        section(
            "Custom PMS Booking to Mews Reservation",
            ("guest", "customerId", '"string"'),
            data_type="Mews Data Type",
        ),
    )
    doc = parse_document(text, source="pms.rst")
    assert doc.systems == ("Custom PMS", "Mews")
    (flow,) = doc.flows
    assert (flow.source.system, flow.source.entity) == ("Custom PMS", "Booking")
    assert (flow.target.system, flow.target.entity) == ("Mews", "Reservation")
    warning = only_warning(doc)
    assert warning.line == line_of(text, MISSING_SYSTEM_TITLE) == 2
    assert warning.message.startswith("pms.rst, line 2: the title names no target system")
    assert "'Mews'" in warning.message


def test_title_with_a_system_missing_reads_it_from_two_section_titles():
    text = document(
        MISSING_SYSTEM_TITLE,
        section("Custom PMS Booking to Mews Reservation", ("a", "b", '"string"')),
        section("Custom PMS Guest to Mews Customer", ("a", "b", '"string"')),
    )
    doc = parse_document(text, source="pms.rst")
    assert doc.systems == ("Custom PMS", "Mews")
    assert [f.target.entity for f in doc.flows] == ["Reservation", "Customer"]
    assert only_warning(doc).line == 2


def test_title_with_a_system_missing_stays_empty_when_sections_do_not_name_it():
    # as Sesam generates it: the name is missing everywhere (two spaces after "to")
    text = document(
        MISSING_SYSTEM_TITLE,
        section("Custom PMS Booking to  Reservation", ("a", "b", '"string"')),
        section("Custom PMS Guest to  Customers person", ("a", "b", '"string"')),
    )
    doc = parse_document(text, source="pms.rst")
    assert doc.systems == ("Custom PMS", "")
    assert [(f.target.system, f.target.entity) for f in doc.flows] == [
        ("", "Reservation"),
        ("", "Customers person"),
    ]
    warning = only_warning(doc)
    assert warning.line == 2 and "left empty" in warning.message
    assert doc.to_json()["systems"] == ["Custom PMS", ""]


def test_title_with_the_source_system_missing():
    text = document(
        "to CRMOffice Dataflow",
        section("Custom CRM Contact to CRMOffice Contacts", ("a", "b", '"string"')),
        section("Custom CRM Product to CRMOffice Companies", ("a", "b", '"string"')),
    )
    doc = parse_document(text, source="x.rst")
    assert doc.systems == ("Custom CRM", "CRMOffice")
    assert [f.source.entity for f in doc.flows] == ["Contact", "Product"]
    assert "no source system" in only_warning(doc).message


# -- 4. a section spelling a system differently --------------------------------------------


@pytest.mark.parametrize(
    ("title", "heading", "systems", "spelled"),
    [
        (
            "YouTrack to Business Central Dataflow",
            "Youtrack Issue to Business Central Item",
            ("YouTrack", "Business Central"),
            ["'Youtrack'"],
        ),
        (
            "YouTrack to Business Central Dataflow",
            "YouTrack Issue to Businesscentral Item",
            ("YouTrack", "Business Central"),
            ["'Businesscentral'"],
        ),
        (
            "Business Central to Exact Online Dataflow",
            "Business Central Customer to Exact Account",
            ("Business Central", "Exact Online"),
            ["'Exact'"],
        ),
    ],
    ids=["case", "spacing", "prefix"],
)
def test_section_system_spelled_differently(title, heading, systems, spelled):
    text = document(title, section(heading, ("a", "b", '"string"')))
    doc = parse_document(text, source="x.rst")
    (flow,) = doc.flows
    assert (flow.source.system, flow.target.system) == systems
    assert (flow.source.entity, flow.target.entity) == (
        heading.split(" to ")[0].split()[-1],
        heading.split()[-1],
    )
    warning = only_warning(doc)
    assert warning.line == line_of(text, heading)
    assert warning.message.startswith(f"x.rst, line {warning.line}: section title spells")
    assert all(s in warning.message for s in spelled)


def test_exact_spelling_wins_over_a_prefix_and_both_spellings_are_one_flow():
    text = document(
        "Business Central to Exact Online Dataflow",
        section("Business Central Customer to Exact Online Account", ("a", "x", '"string"')),
        section("Businesscentral Customer to Exact Account", ("b", "y", '"string"')),
    )
    doc = parse_document(text, source="x.rst")
    (flow,) = doc.flows
    assert flow.title == "Business Central Customer to Exact Online Account"
    assert (flow.source.entity, flow.target.entity) == ("Customer", "Account")
    assert [(p.source, p.target) for p in flow.properties] == [("a", "x"), ("b", "y")]
    assert len(doc.warnings) == 2  # 'Businesscentral' and 'Exact', both on the second heading
    assert {w.line for w in doc.warnings} == {
        line_of(text, "Businesscentral Customer to Exact Account")
    }


# -- read_document, the JSON and the CLI ---------------------------------------------------

QUIRKY = document(
    MISSING_SYSTEM_TITLE,
    section(
        "Custom PMS Booking to Mews Reservation",
        ("mobile", TARGET_CONDITION, '"string"'),
        ("dept", EMPTY_PATH, '"string"'),
        data_type="Mews Data Type",
    ),
)


def test_read_document_names_the_file_in_warnings(tmp_path):
    path = tmp_path / "quirky.rst"
    path.write_bytes(QUIRKY.replace("\n", "\r\n").encode())
    doc = read_document(path)
    assert doc.source == str(path)
    assert [w.line for w in doc.warnings] == [
        2,
        line_of(QUIRKY, TARGET_CONDITION),
        line_of(QUIRKY, EMPTY_PATH),
    ]
    assert all(w.message.startswith(f"{path}, line {w.line}: ") for w in doc.warnings)
    assert doc.to_json()["warnings"] == [
        {"line": w.line, "message": w.message} for w in doc.warnings
    ]


def test_cli_prints_warnings_on_stderr_and_the_document_on_stdout(tmp_path):
    path = tmp_path / "quirky.rst"
    path.write_text(QUIRKY)
    result = run_cli(str(path), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["systems"] == ["Custom PMS", "Mews"]
    props = out["flows"][0]["properties"]
    assert [(p["condition_side"], p["disabled"]) for p in props] == [
        ("target", False),
        ("target", True),
    ]
    lines = result.stderr.splitlines()
    assert len(lines) == 3 == len(out["warnings"])
    assert [f"warning: {w['message']}" for w in out["warnings"]] == lines
    assert lines[0].startswith(f"warning: {path}, line 2: ")

    summary = run_cli(str(path))
    assert summary.returncode == 0
    assert "phone_numbers.number" in summary.stdout and "DISABLED" in summary.stdout
    assert summary.stderr.splitlines() == lines


def test_cli_error_does_not_quote_a_file_that_is_not_a_document(tmp_path):
    secret = "root:x:0:0:root:/root:/bin/bash"
    path = tmp_path / "passwd"
    path.write_text(f"{secret}\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    result = run_cli(str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"error: {path}, line 1: no document title ('<A> to <B> Dataflow' underlined)"
    )
    # an underlined title that is not a dataflow title is not quoted either
    path.write_text(f"{secret}\n=====\n")
    result = run_cli(str(path))
    assert result.returncode == 2
    assert "root:x" not in result.stderr and f"{path}, line 1:" in result.stderr


def test_cli_quotes_a_long_malformed_cell_cut_short(tmp_path):
    long = "x" * 300
    path = tmp_path / "bad.rst"
    path.write_text(
        document("Alpha to Beta Dataflow", section("Alpha A to Beta B", ("a", "b", f'"{long}"')))
    )
    result = run_cli(str(path))
    assert result.returncode == 2
    assert "unknown data type" in result.stderr
    assert len(result.stderr) < 300


def test_spec_parser_plumbs_check():
    from crm_assets.cli import _spec, build_parser

    args = build_parser().parse_args(["spec", "--check", "f.rst"])
    assert (args.run, args.check, args.json) == (_spec, True, False)
    assert build_parser().parse_args(["spec", "f.rst"]).check is False


# -- still malformed -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle", "message"),
    [
        (
            document(
                "Alpha to Beta Dataflow",
                section("Alpha A to Beta B", ("a", "b", '"string"')).replace(
                    '     - "string"\n', ""
                ),
            ),
            "* - a",
            "row has 2 cells",
        ),
        (
            document(
                "Alpha to Beta Dataflow", "Alpha A to Beta B\n-----------------\n\nNo table.\n"
            ),
            "Alpha A to Beta B",
            "no property table",
        ),
        (
            document(
                "Alpha to Beta Dataflow",
                section("Alpha A to Beta B", ("a", "b", '"string"')).replace(
                    "   :header-rows: 1\n", "   :header-rows: 9\n"
                ),
            ),
            '- "string"',
            "truncated table",
        ),
        (
            "Generated: 2024-11-13\n\nAlpha A to Beta B\n-----------------\n",
            "Generated",
            "no document title",
        ),
        (document("to Dataflow", ""), "to Dataflow", "names no system"),
        (
            document(
                "Alpha to Beta Dataflow",
                section("Alpha A to Beta B", ("a (Dependant on having x)", "b", '"string"')),
            ),
            "Dependant",
            "malformed condition",
        ),
    ],
    ids=[
        "wrong-cell-count",
        "no-table",
        "header-rows-past-the-table",
        "no-title",
        "no-systems",
        "condition-without-in",
    ],
)
def test_malformed_input_still_fails_naming_file_and_line(text, needle, message):
    with pytest.raises(DocumentError) as err:
        parse_document(text, source="bad.rst")
    assert err.value.line == line_of(text, needle), str(err.value)
    assert str(err.value).startswith(f"bad.rst, line {err.value.line}: ")
    assert message in str(err.value)


# -- every real document reads ---------------------------------------------------------------


def specs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.rst")) if folder.is_dir() else []


@pytest.mark.parametrize("path", specs(FIXTURES), ids=lambda p: p.name)
def test_every_fixture_document_reads(path):
    doc = read_document(path)
    assert doc.flows
    assert doc.warnings == ()


@pytest.mark.parametrize(
    "name",
    [p.name for p in specs(SHARED)] or ["(no shared/specs folder)"],
)
def test_every_shared_document_reads(name):
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    doc = read_document(SHARED / name)
    assert doc.flows
    for warning in doc.warnings:
        assert warning.message.startswith(f"{SHARED / name}, line {warning.line}: ")


FRAGMENTS = st.sampled_from(
    ["a.b", "x", " ", "  ", "(", ")", "Dependant on having ", " in ", "in", "wd:Q1", "NO", "-"]
)
CELLS = st.lists(FRAGMENTS, min_size=1, max_size=8).map("".join)
TITLES = st.sampled_from(
    ["Alpha to Beta Dataflow", "Alpha to  Dataflow", "to Beta Dataflow", "ALPHA to beta Dataflow"]
)
HEADINGS = st.sampled_from(
    ["Alpha A to Beta B", "alpha A to BETA B", "Al A to Be B", "Alpha A to  B", "A to B", "x"]
)


@settings(max_examples=300, deadline=None)
@given(TITLES, HEADINGS, CELLS, CELLS)
def test_any_cell_or_heading_gives_a_document_or_a_document_error(title, heading, source, target):
    text = document(title, section(heading, (source, target, '"string"')))
    try:
        doc = parse_document(text, source="f.rst")
    except DocumentError as exc:
        assert 1 <= exc.line <= text.count("\n") + 1
        return
    for flow in doc.flows:
        for row in flow.properties:
            assert (row.condition is None) or (row.condition_side in ("source", "target"))
            assert row.disabled is None or row.condition is None
    for warning in doc.warnings:
        assert warning.message.startswith(f"f.rst, line {warning.line}: ")
        assert "\n" not in warning.message
