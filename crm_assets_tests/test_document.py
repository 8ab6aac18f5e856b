"""The dataflow document reader, on every shared document and on malformed input."""

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
    DocumentError,
    parse_document,
    read_document,
)
from crm_assets.settings import packaged_spec_path

SPECS = Path(__file__).parent / "fixtures" / "specs"


def rows(flow):
    return [(p.source, p.target, p.type) for p in flow.properties]


def test_original_input_repeats_contact_section_as_one_flow():
    doc = read_document(SPECS / "customcrm-crmoffice.rst")
    assert doc.title == "Custom CRM to CRMOffice Dataflow"
    assert doc.systems == ("Custom CRM", "CRMOffice")
    assert [f.title for f in doc.flows] == [
        "Custom CRM Contact to CRMOffice Contacts",
        "Custom CRM Product to CRMOffice Companies",
    ]
    contact = doc.flows[0]
    assert (contact.source.system, contact.source.entity) == ("Custom CRM", "Contact")
    assert (contact.target.system, contact.target.entity) == ("CRMOffice", "Contacts")
    assert contact.properties == () and contact.merge == ()


def test_reverse_document_swaps_systems():
    doc = read_document(SPECS / "crmoffice-customcrm.rst")
    assert doc.systems == ("CRMOffice", "Custom CRM")
    assert [(f.source.entity, f.target.entity) for f in doc.flows] == [
        ("Companies", "Product"),
        ("Contacts", "Contact"),
    ]


def test_freshteam_conditional_rows():
    doc = read_document(SPECS / "freshteam-crmoffice.rst")
    (flow,) = doc.flows
    assert flow.name == "employee_to_contacts"
    assert rows(flow) == [
        ("first_name", "givenName", "string"),
        ("last_name", "familyName", "string"),
        ("phone_numbers.number", "directPhone", "string"),
        ("phone_numbers.number", "mobilePhone", "string"),
    ]
    assert [p.condition for p in flow.properties] == [
        None,
        None,
        Condition("wd:Q214995", "phone_numbers.name"),
        Condition("wd:Q17517", "phone_numbers.name"),
    ]


def test_hubspot_crmoffice_flows_with_and_without_rows():
    doc = read_document(SPECS / "hubspot-crmoffice.rst")
    assert doc.systems == ("HubSpot", "CRMOffice")
    assert {f.name: len(f.properties) for f in doc.flows} == {
        "contact_to_contacts": 4,
        "contactcompanyassociation_to_contacts": 0,
        "product_to_companies": 0,
        "user_to_contacts": 0,
    }
    assert rows(doc.flow("contact_to_contacts"))[0] == (
        "properties.firstname",
        "givenName",
        "string",
    )


def test_hubspot_superoffice_merge_block_types_and_conditions():
    doc = read_document(SPECS / "hubspot-superoffice.rst")
    assert len(doc.flows) == 10
    person = doc.flow("HubSpot Contact to SuperOffice Person")
    assert [(m.source, m.target) for m in person.merge] == [("properties.email", "Emails.Value")]
    assert len(person.properties) == 11
    assert ("properties.date_of_birth", "BirthDate", None) in rows(person)
    assert ("id", "PersonId", "integer") in rows(person)
    company = doc.flow("company_to_contact")
    assert company.merge == ()
    assert len(company.properties) == 13
    # one source feeding two targets is two rows
    assert [t for s, t, _ in rows(company) if s == "properties.zip"] == [
        "Address.Postal.Zipcode",
        "Address.Street.Zipcode",
    ]
    assoc = doc.flow("contactcompanyassociation_to_person")
    assert assoc.properties[0].condition == Condition("wd:Q703534", "sesam_simpleAssociationTypes")
    deal = doc.flow("deal_to_sale")
    assert ("properties.amount", "Amount", "float") in rows(deal)
    assert doc.flow("user_to_person").properties == ()


def test_packaged_document_has_the_designed_rows():
    doc = read_document(packaged_spec_path())
    assert doc.systems == ("Custom CRM", "CRMOffice")
    contact, product = doc.flows
    assert [(m.source, m.target) for m in contact.merge] == [("Email", "email")]
    assert rows(contact) == [
        ("Email", "email", "string"),
        ("FirstName", "givenName", "string"),
        ("LastName", "familyName", "string"),
        ("Phone", "directPhone", "string"),
        ("MobilePhone", "mobilePhone", "string"),
        ("Title", "title", "string"),
        ("ProductId", "company.id", "string"),
    ]
    assert [(m.source, m.target) for m in product.merge] == [("Name", "name")]
    assert rows(product) == [
        ("Name", "name", "string"),
        ("ProductNumber", "orgNr", "string"),
        ("Description", "description", "string"),
        ("Url", "website", "string"),
        ("Active", "isActive", "boolean"),
        ("Street", "visitAddress.streetAddress", "string"),
        ("PostalCode", "visitAddress.postCode", "string"),
        ("City", "visitAddress.postalArea", "string"),
        ("Country", "visitAddress.country", "string"),
    ]


@pytest.mark.parametrize("name", sorted(p.name for p in SPECS.glob("*.rst")))
def test_crlf_and_lf_read_the_same(name):
    raw = (SPECS / name).read_bytes()
    lf = raw.replace(b"\r\n", b"\n")
    crlf = lf.replace(b"\n", b"\r\n")
    assert parse_document(lf).to_json() == parse_document(crlf).to_json()


DOC = """\
=====================
Alpha to Beta Gamma Dataflow
=====================

Alpha Thing to Beta Gamma Widget
--------------------------------
A Alpha Thing will merge with a Beta Gamma Widget if one of the following property combinations match:

.. list-table::
   :header-rows: 1

   * - Alpha Thing Property
     - Beta Gamma Widget Property
   * - mail
     - email

The following properties are synchronized:

.. list-table::
   :header-rows: 1

   * - Alpha Thing Property
     - Beta Gamma Widget Property
     - Beta Gamma Data Type
   * - a
     - x.y
     - "string"
{extra}
"""


def test_same_title_sections_union_in_order_and_systems_with_spaces():
    extra = """
Alpha Thing to Beta Gamma Widget
--------------------------------

.. list-table::
   :header-rows: 1

   * - h
     - h
     - h
   * - b
     - z
     - "integer"
   * - a
     - x.y
     - "string"
"""
    doc = parse_document(DOC.format(extra=extra))
    assert doc.systems == ("Alpha", "Beta Gamma")
    (flow,) = doc.flows
    assert flow.target.entity == "Widget"
    assert rows(flow) == [("a", "x.y", "string"), ("b", "z", "integer")]
    assert [(m.source, m.target) for m in flow.merge] == [("mail", "email")]


def test_same_pair_with_two_types_is_an_error_naming_the_line():
    extra = """
Alpha Thing to Beta Gamma Widget
--------------------------------

.. list-table::
   :header-rows: 1

   * - h
     - h
     - h
   * - a
     - x.y
     - "integer"
"""
    text = DOC.format(extra=extra)
    with pytest.raises(DocumentError) as err:
        parse_document(text)
    line = text.splitlines().index("   * - a", 30) + 1
    assert err.value.line == line
    assert "declared twice" in str(err.value)


def line_of(text: str, needle: str) -> int:
    """The number of the last line holding ``needle``."""
    return max(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


@pytest.mark.parametrize(
    ("text", "needle", "message"),
    [
        # a row with two cells in a three-column table
        (DOC.format(extra="").replace('     - "string"\n', ""), "   * - a", "has 2 cells"),
        # a truncated table: the document ends inside the header row
        (
            DOC.format(extra="").split("     - Beta Gamma Data Type")[0],
            "* - Alpha Thing Property",
            "truncated",
        ),
        # an unknown data type
        (DOC.format(extra="").replace('"string"', '"date"'), '"date"', "unknown data type"),
        # a malformed condition
        (DOC.format(extra="").replace("* - a", "* - a (if b)"), "(if b)", "condition"),
        # a title without "Dataflow"
        (DOC.format(extra="").replace(" Dataflow", ""), "Alpha to Beta", "Dataflow"),
    ],
    ids=["row-with-two-cells", "truncated-table", "unknown-type", "bad-condition", "no-dataflow"],
)
def test_malformed_documents_name_the_line(text, needle, message):
    with pytest.raises(DocumentError) as err:
        parse_document(text)
    expected = line_of(text, needle)
    assert err.value.line == expected, str(err.value)
    assert message in str(err.value)
    assert f"line {expected}" in str(err.value)


def test_section_with_no_table_names_the_section_line():
    text = DOC.format(
        extra="\nAlpha Other to Beta Gamma Thing\n-------------------------------\nNo table.\n"
    )
    with pytest.raises(DocumentError) as err:
        parse_document(text)
    assert err.value.line == line_of(text, "Alpha Other to Beta Gamma Thing")
    assert "no property table" in str(err.value)


@pytest.mark.parametrize("data", [b"", b"\n\n   \r\n"])
def test_empty_document(data):
    with pytest.raises(DocumentError, match="line 1: empty document"):
        parse_document(data)


def test_binary_garbage():
    data = b"Custom CRM to CRMOffice Dataflow\n=====\n\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"
    with pytest.raises(DocumentError) as err:
        parse_document(data)
    assert err.value.line == 3


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=400))
def test_arbitrary_input_gives_a_document_or_a_document_error(data):
    try:
        parse_document(data)
    except DocumentError as exc:
        assert exc.line >= 1


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=400))
def test_every_truncation_of_a_real_document_is_handled(cut):
    text = (SPECS / "hubspot-superoffice.rst").read_text()
    prefix = text[: len(text) * cut // 400]
    try:
        parse_document(prefix)
    except DocumentError as exc:
        assert 1 <= exc.line <= prefix.count("\n") + 1


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys; from crm_assets.cli import main; rc = main(sys.argv[1:]);"
        "assert 'dagster' not in sys.modules, 'spec imported dagster'; sys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
    )


def test_cli_prints_the_json_contract_without_importing_dagster():
    result = run_cli("spec", str(SPECS / "freshteam-crmoffice.rst"), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["title"] == "Freshteam to CRMOffice Dataflow"
    assert out["systems"] == ["Freshteam", "CRMOffice"]
    flow = out["flows"][0]
    assert flow["source"] == {"system": "Freshteam", "entity": "Employee"}
    assert flow["target"] == {"system": "CRMOffice", "entity": "Contacts"}
    assert flow["merge"] == []
    assert flow["properties"][3] == {
        "source": "phone_numbers.number",
        "target": "mobilePhone",
        "type": "string",
        "condition": {"value": "wd:Q17517", "path": "phone_numbers.name"},
        "condition_side": "source",
        "disabled": False,
        "disabled_reason": None,
    }


def test_cli_summary_and_error(tmp_path):
    result = run_cli("spec", str(packaged_spec_path()))
    assert result.returncode == 0
    assert "merge on  Email = email" in result.stdout
    assert "ProductId -> company.id  (string)" in result.stdout
    bad = tmp_path / "bad.rst"
    bad.write_text("Just a heading\n=====\n")
    result = run_cli("spec", str(bad))
    assert result.returncode == 2
    assert "bad.rst, line 1:" in result.stderr and "Dataflow" in result.stderr


def test_cli_reads_several_documents_with_their_flow_names_qualified():
    """As ``CRM_SYNC_SPEC`` does with several: the names ``--flow`` then takes."""
    both = [str(packaged_spec_path()), str(packaged_spec_path().with_name("hubspot-crmoffice.rst"))]
    result = run_cli("spec", *both)
    assert result.returncode == 0, result.stderr
    assert "[customcrm_crmoffice__contact_to_contacts]" in result.stdout
    assert "[hubspot_crmoffice__contact_to_contacts]" in result.stdout
    result = run_cli("spec", "--json", *both)
    assert [d["title"] for d in json.loads(result.stdout)] == [
        "Custom CRM to CRMOffice Dataflow",
        "HubSpot to CRMOffice Dataflow",
    ]
