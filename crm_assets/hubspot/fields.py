"""HubSpot's objects as the sync sees them: fields (dotted names, as documents address them),
types and roles.

HubSpot's CRM v3 objects API returns ``{"id", "properties": {...}, "createdAt", "updatedAt",
"archived"}``; every property value is a string on the wire (numbers and booleans too). The
client converts them to the types below on read and back to strings on write, so the engine
sees ``properties.price`` as a float and ``properties.is_public`` as a boolean. A contact's
primary company is exposed as ``associations.companies`` (one company id), written through
the v4 associations endpoints.
"""

from __future__ import annotations

from crm_assets.engine.objects import FieldRoles

SYSTEM = "HubSpot"
KEY = "hubspot"

#: The writable properties the connector reads and writes, per object, with their types.
PROPERTIES: dict[str, dict[str, str]] = {
    "contacts": {
        "firstname": "string",
        "lastname": "string",
        "email": "string",
        "phone": "string",
        "mobilephone": "string",
        "jobtitle": "string",
        "company": "string",
        "address": "string",
        "city": "string",
        "zip": "string",
        "country": "string",
    },
    "companies": {
        "name": "string",
        "domain": "string",
        "website": "string",
        "phone": "string",
        "description": "string",
        "industry": "string",
        "address": "string",
        "city": "string",
        "zip": "string",
        "country": "string",
        "numberofemployees": "integer",
        "annualrevenue": "float",
        "is_public": "boolean",
    },
    "products": {
        "name": "string",
        "description": "string",
        "price": "float",
        "hs_sku": "string",
        "hs_cost_of_goods_sold": "float",
        "hs_url": "string",
    },
}

#: The property holding each object's modification time (what search filters and sorts on).
MODIFIED_PROPERTY = {
    "contacts": "lastmodifieddate",
    "companies": "hs_lastmodifieddate",
    "products": "hs_lastmodifieddate",
}

#: Associations exposed as reference fields: object -> {field: associated object}.
ASSOCIATIONS: dict[str, dict[str, str]] = {
    "contacts": {"associations.companies": "companies"},
}

_MANAGED = {
    "createdAt": "datetime",
    "updatedAt": "datetime",
    "archived": "boolean",
}

#: The objects the API serves, with their fields (dotted names) and types.
FIELDS: dict[str, dict[str, str]] = {
    obj: {
        "id": "string",
        **{f"properties.{name}": kind for name, kind in props.items()},
        **dict.fromkeys(ASSOCIATIONS.get(obj, {}), "string"),
        **_MANAGED,
    }
    for obj, props in PROPERTIES.items()
}

#: Fields the server manages; never sent in a create or update.
SERVER_FIELDS = frozenset({"id", *_MANAGED})

#: No optimistic-concurrency token exists: ``updatedAt`` is the version the sync planned
#: from; the client re-reads it right before an update and answers ``conflict`` when it moved.
ROLES = FieldRoles(SYSTEM, KEY, "id", "updatedAt", "createdAt", "updatedAt", "archived")

OBJECTS = (
    ROLES.object("Contact", "contacts", FIELDS["contacts"], dict(ASSOCIATIONS["contacts"])),
    ROLES.object("Company", "companies", FIELDS["companies"], {}),
    ROLES.object("Product", "products", FIELDS["products"], {}),
)
