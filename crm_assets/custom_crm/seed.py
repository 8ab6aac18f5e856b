"""Custom CRM's demo records: its side (side 0) of the shared world, as API documents.

Products are the world's organisations (the shared ones first, then Custom CRM's own),
contacts its people (the shared ones first, with their e-mail exactly as the world has it,
then its own). A contact's ``ProductId`` points at its employer: for a shared person the
product standing for the same shared organisation CRMOffice gives as ``company.id``.
Pure Python, no FastAPI: the same N gives the same records (see ``crm_assets/embedded/seed.py``).
"""

from __future__ import annotations

from typing import Any

from crm_assets.embedded.seed import World

CONTACT_PREFIX = "C-"
PRODUCT_PREFIX = "P-"


def custom_id(prefix: str, number: int) -> str:
    """Custom CRM ids: ``C-000001`` (contacts), ``P-000001`` (products)."""
    return f"{prefix}{number:06d}"


def demo_records(n: int) -> dict[str, list[dict[str, Any]]]:
    """The seeded records for ``--seed n`` by object name, parents first (none for n <= 0)."""
    if n <= 0:
        return {}
    world = World(n)
    return {"products": _products(world), "contacts": _contacts(world)}


def _products(world: World) -> list[dict[str, Any]]:
    rng = world.rng("custom-products")
    out = []
    for i in range(world.p):
        org = world.org(0, i)
        created, modified = world.stamps(rng)
        out.append(
            {
                "Id": custom_id(PRODUCT_PREFIX, i + 1),
                "Name": org.name,
                "ProductNumber": int(org.org_nr) if rng.random() > 0.03 else None,
                "Description": org.description,
                "Url": org.website,
                "Active": org.active,
                "Street": org.street,
                "PostalCode": org.post_code,
                "City": org.city,
                "Country": org.country,
                "Created": created,
                "Modified": modified,
                "Version": 1,
                "Deleted": False,
            }
        )
    return out


def _contacts(world: World) -> list[dict[str, Any]]:
    rng = world.rng("custom-contacts")
    own = world.people(world.rng("custom-people"), world.n - world.shared_c, "{f}.{l}")
    people = world.shared_people + own
    out = []
    for i in range(world.n):
        person = people[i]
        if rng.random() < 0.1:
            product = None
        elif i < world.shared_c:
            product = custom_id(PRODUCT_PREFIX, world.employer_shared(i) + 1)
        else:
            product = custom_id(PRODUCT_PREFIX, rng.below(world.p) + 1)
        created, modified = world.stamps(rng)
        out.append(
            {
                "Id": custom_id(CONTACT_PREFIX, i + 1),
                "FirstName": person.first,
                "LastName": person.last,
                "Email": person.email,
                "Phone": person.phone,
                "MobilePhone": person.mobile,
                "Title": person.title,
                "ProductId": product,
                "Created": created,
                "Modified": modified,
                "Version": 1,
                "Deleted": False,
            }
        )
    return out
