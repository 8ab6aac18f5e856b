"""HubSpot's demo records: a third projection of the shared world, as API documents.

Companies are the world's organisations (the shared ones first, then the same own ones as
Custom CRM's side, so HubSpot overlaps CRMOffice exactly where Custom CRM does); contacts
are the shared people first (so they merge with CRMOffice's on e-mail), then HubSpot's own
(their own random stream and e-mail format, never colliding with either other CRM's). A
contact's primary company is its employer: for a shared person the company standing for the
same shared organisation CRMOffice gives as ``company.id``. A handful of products round it
off. HubSpot's quirks: e-mails are stored lower-cased (HubSpot does), ids are numeric
strings, stamps have millisecond precision.

Pure Python, no FastAPI: the same N gives the same records (see ``crm_assets/embedded/seed.py``).
"""

from __future__ import annotations

from typing import Any

from crm_assets.embedded.seed import ORG_CORES, World

#: Numeric id ranges per object (distinct, so an id of one never passes for another's).
ID_START = {"contacts": 100_000_001, "companies": 200_000_001, "products": 300_000_001}
INDUSTRIES = (
    "COMPUTER_SOFTWARE",
    "INFORMATION_TECHNOLOGY_AND_SERVICES",
    "LOGISTICS_AND_SUPPLY_CHAIN",
    "MARKETING_AND_ADVERTISING",
    "FOOD_BEVERAGES",
    "MARITIME",
    "RENEWABLES_ENVIRONMENT",
)


def hubspot_id(obj: str, index: int) -> str:
    """The id of the ``index``-th (0-based) record of an object: ``100000001``, ..."""
    return str(ID_START[obj] + index)


def ms(stamp: str) -> str:
    """A fixed-width microsecond UTC stamp (``...SS.ffffffZ``) as HubSpot writes times:
    milliseconds (``...SS.fffZ``)."""
    return stamp[:23] + "Z"


def demo_records(n: int) -> dict[str, list[dict[str, Any]]]:
    """The seeded records for ``--seed n`` by object name, parents first (none for n <= 0)."""
    if n <= 0:
        return {}
    world = World(n)
    return {
        "companies": _companies(world),
        "products": _products(world),
        "contacts": _contacts(world),
    }


def _doc(obj: str, index: int, props: dict[str, Any], created: str, modified: str) -> dict:
    record_id = hubspot_id(obj, index)
    return {
        "id": record_id,
        "properties": {k: v for k, v in props.items() if v not in (None, "")},
        "createdAt": ms(created),
        "updatedAt": ms(modified),
        "archived": False,
    }


def _companies(world: World) -> list[dict[str, Any]]:
    rng = world.rng("hubspot-companies")
    out = []
    for i in range(world.p):
        org = world.org(0, i)
        created, modified = world.stamps(rng)
        props = {
            "name": org.name,
            "domain": org.domain,
            "website": org.website,
            "description": org.description if rng.random() > 0.05 else None,
            "industry": rng.pick(INDUSTRIES) if rng.random() < 0.7 else None,
            "address": org.street,
            "city": org.city,
            "zip": org.post_code,
            "country": org.country,
            "numberofemployees": str(rng.randint(1, 5000)) if rng.random() < 0.8 else None,
            "annualrevenue": f"{rng.randint(1, 500) * 100000}" if rng.random() < 0.5 else None,
            "is_public": "false" if rng.random() < 0.9 else "true",
        }
        out.append(_doc("companies", i, props, created, modified))
    return out


def _products(world: World) -> list[dict[str, Any]]:
    rng = world.rng("hubspot-products")
    out = []
    for i in range(max(1, world.p // 2)):
        core = rng.pick(ORG_CORES)
        created, modified = world.stamps(rng)
        price = rng.randint(10, 5000) * 10
        props = {
            "name": f"{core} package {i + 1}",
            "description": f"{core} services, billed monthly.",
            "price": str(price),
            "hs_sku": f"SKU-{i + 1:05d}",
            "hs_cost_of_goods_sold": str(price // 2) if rng.random() < 0.5 else None,
        }
        out.append(_doc("products", i, props, created, modified))
    return out


def _contacts(world: World) -> list[dict[str, Any]]:
    rng = world.rng("hubspot-contacts")
    own = world.people(world.rng("hubspot-people"), world.n - world.shared_c, "{f}_{l}")
    people = world.shared_people + own
    out = []
    for i in range(world.n):
        person = people[i]
        if rng.random() < 0.1:
            company = None
        elif i < world.shared_c:
            company = hubspot_id("companies", world.employer_shared(i))
        else:
            company = hubspot_id("companies", rng.below(world.p))
        created, modified = world.stamps(rng)
        props = {
            "firstname": person.first,
            "lastname": person.last,
            "email": person.email.strip().lower(),
            "phone": person.phone,
            "mobilephone": person.mobile,
            "jobtitle": person.title,
        }
        doc = _doc("contacts", i, props, created, modified)
        doc["companies"] = [{"id": company, "primary": True}] if company else []
        out.append(doc)
    return out
