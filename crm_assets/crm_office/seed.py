"""CRMOffice's demo records: its side (side 1) of the shared world, as API documents.

Companies are the world's organisations (the shared ones first, then CRMOffice's own),
contacts its people (the shared ones first, then its own), with the quirks of a second
system holding the same people:

- a shared person's e-mail sometimes differs in case (~10 %) or has stray whitespace (~2 %);
- a shared company's name sometimes has a trailing space; a few conflicting values (title,
  phone, website, active) and a few empty fields;
- ambiguous duplicates: CRMOffice-only contacts that reuse a shared person's e-mail (two
  CRMOffice candidates for one Custom CRM contact) and CRMOffice-only companies that reuse a
  shared product's name;
- ``company.id`` points at the employer: for a shared person the company standing for the
  same shared organisation Custom CRM gives as ``ProductId``.

Pure Python, no FastAPI: the same N gives the same records (see ``crm_assets/embedded/seed.py``).
"""

from __future__ import annotations

from typing import Any

from crm_assets.embedded.seed import TITLES, World

#: Numeric id ranges (distinct so a contact id never passes for a company id).
COMPANY_START = 1001
CONTACT_START = 100001


def office_id(number: int) -> str:
    """CRMOffice ids are integers rendered as strings, e.g. ``"1001"``."""
    return str(number)


def demo_records(n: int) -> dict[str, list[dict[str, Any]]]:
    """The seeded records for ``--seed n`` by object name, parents first (none for n <= 0)."""
    if n <= 0:
        return {}
    world = World(n)
    return {"companies": _companies(world), "contacts": _contacts(world)}


def _companies(world: World) -> list[dict[str, Any]]:
    rng = world.rng("office-companies")
    only = world.p - world.shared_p  # CRMOffice-only companies, some become duplicates
    n_dupes = min(only, max(1, world.p // 100)) if world.p >= 3 else 0
    dupes = {world.p - 1 - k for k in range(n_dupes)}
    out = []
    for j in range(world.p):
        org = world.org(1, j)
        name, website, description, active = org.name, org.website, org.description, org.active
        if j < world.shared_p:
            roll = rng.random()
            if roll < 0.03:
                name = name + " "  # stray whitespace
            elif roll < 0.06:
                website = f"https://{org.domain}"  # conflicting value
            elif roll < 0.09:
                description = None  # empty on this side
            elif roll < 0.1:
                active = not active  # conflicting value
        elif j in dupes:
            # ambiguous: a second company with the name of a shared product
            name = world.org(1, (world.p - 1 - j) % world.shared_p).name
        created, modified = world.stamps(rng)
        visit = None
        if org.street is not None or rng.random() < 0.5:
            visit = {
                "streetAddress": org.street,
                "postCode": org.post_code,
                "postalArea": org.city,
                "country": org.country,
            }
        post = None
        if rng.random() >= 0.3:
            post = {
                "streetAddress": f"Postboks {rng.randint(1, 9999)}",
                "postCode": org.post_code,
                "postalArea": org.city,
                "country": org.country,
            }
        out.append(
            {
                "id": office_id(COMPANY_START + j),
                "name": name,
                "orgNr": org.org_nr if rng.random() > 0.05 else None,
                "website": website,
                "description": description,
                "isActive": active,
                "postAddress": post,
                "visitAddress": visit,
                "createdAt": created,
                "updatedAt": modified,
                "rowVersion": 1,
            }
        )
    return out


def _contacts(world: World) -> list[dict[str, Any]]:
    rng = world.rng("office-contacts")
    own = world.people(world.rng("office-people"), world.n - world.shared_c, "{i}.{l}")
    people = world.shared_people + own
    only = world.n - world.shared_c
    n_dupes = min(only, max(1, world.n // 200)) if world.n >= 3 and world.shared_c else 0
    dupes = {world.n - 1 - k for k in range(n_dupes)}
    out = []
    for j in range(world.n):
        person = people[j]
        email, title, phone, mobile = person.email, person.title, person.phone, person.mobile
        if j < world.shared_c:
            roll = rng.random()
            if roll < 0.06:
                email = email[0].upper() + email[1:]  # differs only in case
            elif roll < 0.1:
                email = email.upper()
            elif roll < 0.12:
                email = f" {email} " if roll < 0.11 else f"{email} "  # stray whitespace
            roll = rng.random()
            if roll < 0.03:
                title = rng.pick(TITLES)  # conflicting title
            elif roll < 0.06:
                phone = world.phone(rng, mobile=False)  # conflicting phone
            elif roll < 0.09:
                mobile = None  # empty on this side
            company_index = world.employer_shared(j)
        else:
            if j in dupes:
                # ambiguous: a second CRMOffice contact with a shared person's e-mail
                email = world.shared_people[(world.n - 1 - j) % world.shared_c].email
            company_index = rng.below(world.p)
        company = None if rng.random() < 0.1 else {"id": office_id(COMPANY_START + company_index)}
        created, modified = world.stamps(rng)
        out.append(
            {
                "id": office_id(CONTACT_START + j),
                "givenName": person.first,
                "familyName": person.last,
                "email": email,
                "directPhone": phone,
                "mobilePhone": mobile,
                "title": title,
                "company": company,
                "createdAt": created,
                "updatedAt": modified,
                "rowVersion": 1,
            }
        )
    return out
