"""CRMOffice's objects as the sync sees them: fields (flattened, dotted names), types and roles."""

from __future__ import annotations

from crm_assets.engine.objects import FieldRoles

SYSTEM = "CRMOffice"
KEY = "crm_office"

_ADDRESS = ("streetAddress", "postCode", "postalArea", "country")
_MANAGED = {"createdAt": "datetime", "updatedAt": "datetime", "rowVersion": "string"}

#: The objects the API serves, with their fields (flattened, dotted names) and types.
FIELDS: dict[str, dict[str, str]] = {
    "contacts": {
        "id": "string",
        "givenName": "string",
        "familyName": "string",
        "email": "string",
        "directPhone": "string",
        "mobilePhone": "string",
        "title": "string",
        "company.id": "string",
        **_MANAGED,
    },
    "companies": {
        "id": "string",
        "name": "string",
        "orgNr": "string",
        "website": "string",
        "description": "string",
        "isActive": "boolean",
        **{f"postAddress.{f}": "string" for f in _ADDRESS},
        **{f"visitAddress.{f}": "string" for f in _ADDRESS},
        **_MANAGED,
    },
}

#: Fields the server manages; never sent in a create or replace.
SERVER_FIELDS = frozenset({"id", *_MANAGED})


ROLES = FieldRoles(SYSTEM, KEY, "id", "updatedAt", "createdAt", "rowVersion", None)

OBJECTS = (
    ROLES.object("Contacts", "contacts", FIELDS["contacts"], {"company.id": "companies"}),
    ROLES.object("Companies", "companies", FIELDS["companies"], {}),
)
