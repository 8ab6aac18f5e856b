"""Custom CRM's objects as the sync sees them: fields (flattened names), types and roles."""

from __future__ import annotations

from crm_assets.engine.objects import FieldRoles

SYSTEM = "Custom CRM"
KEY = "custom_crm"

_MANAGED = {
    "Created": "datetime",
    "Modified": "datetime",
    "Version": "integer",
    "Deleted": "boolean",
}

#: The objects the API serves, with their fields (flattened names) and types.
FIELDS: dict[str, dict[str, str]] = {
    "contacts": {
        "Id": "string",
        "FirstName": "string",
        "LastName": "string",
        "Email": "string",
        "Phone": "string",
        "MobilePhone": "string",
        "Title": "string",
        "ProductId": "string",
        **_MANAGED,
    },
    "products": {
        "Id": "string",
        "Name": "string",
        "ProductNumber": "integer",
        "Description": "string",
        "Url": "string",
        "Active": "boolean",
        "Street": "string",
        "PostalCode": "string",
        "City": "string",
        "Country": "string",
        **_MANAGED,
    },
}

#: Fields the server manages; never sent in a create or update.
SERVER_FIELDS = frozenset({"Id", *_MANAGED})


ROLES = FieldRoles(SYSTEM, KEY, "Id", "Modified", "Created", "Version", "Deleted")

OBJECTS = (
    ROLES.object("Contact", "contacts", FIELDS["contacts"], {"ProductId": "products"}),
    ROLES.object("Product", "products", FIELDS["products"], {}),
)
