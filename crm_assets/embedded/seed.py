"""Deterministic demo data for both embedded CRMs.

``--seed N`` gives each CRM N contacts and ``max(1, N // 10)`` products/companies, drawn from
one shared "world" so that the two CRMs overlap the way real ones do:

- ~60 % of the people are in both CRMs with the same e-mail; on the CRMOffice side the
  address sometimes differs in case (~10 %) or has stray whitespace (~2 %);
- ~60 % of the products share their name with a company (a trailing space now and then),
  with the same number/url/address unless the values conflict;
- a few ambiguous duplicates: CRMOffice-only contacts that reuse the e-mail of a shared
  person (two CRMOffice candidates for one Custom CRM contact), and CRMOffice-only
  companies that reuse the name of a shared product;
- a few conflicting values (same person, different title or phone; same company,
  different website or description) and a few empty fields;
- contacts reference their employer: ``ProductId`` in Custom CRM, ``company.id`` in
  CRMOffice, pointing at corresponding records for shared people.

Both services generate the same world from N alone (``random.Random`` with an N-derived
seed), so each can seed itself without talking to the other. Pure Python, no I/O: 100,000
contacts per side take well under a second or two.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

SHARE = 0.6


def _words(text: str, sep: str | None = None) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(sep) if part.strip())


FIRST_NAMES = _words(
    "Ola Kari Nils Ingrid Lars Anne Per Marit Jon Sigrid Erik Hilde Knut Liv Bjørn Astrid "
    "Magnus Nora Henrik Emma Sofie Jakob Ida Filip Maja Anders Tone Håkon Silje Øystein "
    "Mette Tor Camilla Geir Ragnhild Aksel Thea Sander Eirik Julie Mohammed Fatima Ali Aisha "
    "Piotr Anna Tomasz Agnieszka John Mary James Linda Michael Sarah David Laura Carlos Lucia "
    "Wei Mei Hiroshi Yuki Arjun Priya Lukas Lea Jonas Mia"
)
LAST_NAMES = _words(
    "Nordmann Hansen Johansen Olsen Larsen Andersen Pedersen Nilsen Kristiansen Jensen "
    "Karlsen Johnsen Pettersen Eriksen Berg Haugen Hagen Johannessen Andreassen Jacobsen "
    "Dahl Jørgensen Halvorsen Henriksen Lund Sørensen Jakobsen Moen Gundersen Iversen "
    "Strand Solberg Svendsen Eide Knutsen Martinsen Paulsen Bakken Kristoffersen Mathisen "
    "Lie Amundsen Nguyen Rasmussen Ali Khan Kowalski Nowak Smith Jones Brown García "
    "Müller Schmidt Rossi Tanaka Wang Singh Østby Aasen Fjeld Bråthen"
)
TITLES = (
    "CEO",
    "CFO",
    "CTO",
    "Sales Manager",
    "Account Manager",
    "Key Account Manager",
    "Marketing Director",
    "Product Owner",
    "Project Manager",
    "Consultant",
    "Senior Consultant",
    "Developer",
    "Data Engineer",
    "Purchasing Manager",
    "HR Advisor",
    "Office Manager",
    "Customer Success Lead",
    "Head of Operations",
    "Controller",
    "Daglig leder",
)
ORG_PREFIXES = _words(
    "Nordic Fjord Polar Aurora Viking Granite Birch Coastal Northern Summit Harbor Glacier "
    "Midnight Silver Boreal Pine Tidal Arctic Westwind Lighthouse Saga Troll Nordlys Havblikk "
    "Fjell Skog Bølge Stjerne Kyst Dal Elv Vinter Sommer Lys Stein Jern Gull Blå Grønn Rød "
    "Atlas Vector Quantum Apex Orbit Prism Zenith Nimbus Helix Cobalt Onyx Amber Falcon "
    "Raven Wolf Bear Elk Lynx Otter"
)
ORG_CORES = _words(
    "Analytics Consulting Logistics Energy Solutions Systems Software Foods Seafood Shipping "
    "Media Design Health Robotics Finance Capital Insurance Telecom Bygg Eiendom Transport "
    "Marine Data Labs Networks Security Furniture Textiles Outdoor Apparel Coffee Brewing "
    "Pharma Biotech Learning Travel Events Cleaning Electric Recycling Hydro"
)
LEGAL_FORMS = ("AS", "ASA", "Group", "Holding AS", "& Co", "Norge AS", "Nordic AB", "")
STREETS = _words(
    "Storgata, Kirkegata, Dronningens gate, Kongens gate, Karl Johans gate, Bogstadveien, "
    "Thorvald Meyers gate, Markveien, Torggata, Strandgata, Havnegata, Sjøgata, Parkveien, "
    "Skolegata, Industriveien, Fjordveien, Bryggen, Nedre Slottsgate, Øvre Vollgate, "
    "Sandakerveien, Trondheimsveien, Drammensveien, Grensen, Akersgata, Prinsens gate",
    ",",
)
CITIES = (
    ("Oslo", "0"),
    ("Bergen", "50"),
    ("Trondheim", "70"),
    ("Stavanger", "40"),
    ("Tromsø", "90"),
    ("Kristiansand", "46"),
    ("Drammen", "30"),
    ("Fredrikstad", "16"),
    ("Bodø", "80"),
    ("Ålesund", "60"),
    ("Lillehammer", "26"),
    ("Hamar", "23"),
)
COUNTRIES = ("Norway",) * 8 + ("Sweden", "Denmark")
MAIL_DOMAINS = ("gmail.com", "outlook.com", "hotmail.com", "online.no", "yahoo.com")
DESCRIPTIONS = (
    "Supplier of {core} services to the Nordic market.",
    "Long-standing partner in {core}; framework agreement renewed yearly.",
    "{name} delivers {core} for public and private customers.",
    "Family-owned company specialising in {core}.",
    "Key account. Contact the account manager before changing terms.",
    "Start-up in {core}, onboarded through the partner programme.",
)

# Stable, fixed "now" for seeded timestamps so two seedings are byte-identical.
_SEED_NOW_US = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp()) * 1_000_000
_YEAR_US = 365 * 86_400 * 1_000_000
_MONTH_US = 30 * 86_400 * 1_000_000

CUSTOM_CONTACT_PREFIX = "C-"
CUSTOM_PRODUCT_PREFIX = "P-"
#: CRMOffice numeric id ranges (distinct so a contact id never passes for a company id).
OFFICE_COMPANY_START = 1001
OFFICE_CONTACT_START = 100001


def custom_id(prefix: str, number: int) -> str:
    """Custom CRM ids: ``C-000001`` (contacts), ``P-000001`` (products)."""
    return f"{prefix}{number:06d}"


def office_id(number: int) -> str:
    """CRMOffice ids are integers rendered as strings, e.g. ``"1001"``."""
    return str(number)


@dataclass(slots=True)
class _Org:
    name: str
    core: str
    org_nr: str
    website: str | None
    description: str | None
    active: bool
    street: str | None
    post_code: str | None
    city: str | None
    country: str | None
    domain: str


@dataclass(slots=True)
class _Person:
    first: str
    last: str
    email: str
    phone: str | None
    mobile: str | None
    title: str | None


_SLUG_TABLE = str.maketrans(
    {"æ": "ae", "ø": "o", "å": "a", "ü": "u", "é": "e", "á": "a", "í": "i", "ö": "o", "ä": "a"}
)
_slugs: dict[str, str] = {}


def _slug(text: str) -> str:
    cached = _slugs.get(text)
    if cached is None:
        cached = _slugs[text] = re.sub(r"[^a-z0-9]+", "", text.lower().translate(_SLUG_TABLE))
    return cached


_EPOCH_NAIVE = datetime(1970, 1, 1)


def _stamp(us: int) -> str:
    """Same text as :func:`format_us`, several times faster (isoformat, naive UTC)."""
    return (_EPOCH_NAIVE + timedelta(microseconds=us)).isoformat(timespec="microseconds") + "Z"


class _Rng(random.Random):
    """``random.Random`` with a cheaper pick (a float index instead of rejection sampling)."""

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.random() * len(seq))]

    def below(self, n: int) -> int:
        return int(self.random() * n)


class _World:
    """Everything both CRMs are seeded from, for one N.

    Each part (organisations, shared people, each side's own people, each side's records)
    has its own random stream, so a CRM only generates what it holds and still agrees with
    the other one on everything shared.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.p = max(1, n // 10)
        self.shared_p = max(1, round(self.p * SHARE))
        self.shared_c = round(n * SHARE)
        # organisations: 0..shared_p-1 shared, then Custom-CRM-only, then CRMOffice-only
        self.orgs = self._orgs(self._rng("orgs"), 2 * self.p - self.shared_p)
        self.shared_people = self._people(self._rng("shared-people"), self.shared_c, "{f}.{l}")
        self.shared_emails = {person.email for person in self.shared_people}

    def _rng(self, part: str) -> _Rng:
        return _Rng(f"crm-assets-demo-{self.n}-{part}")

    # -- building blocks -----------------------------------------------------------------
    def _orgs(self, rng: _Rng, count: int) -> list[_Org]:
        used: set[str] = set()
        orgs: list[_Org] = []
        for _ in range(count):
            core = rng.pick(ORG_CORES)
            base = f"{rng.pick(ORG_PREFIXES)} {core} {rng.pick(LEGAL_FORMS)}".strip()
            name, k = base, 1
            while name in used:
                k += 1
                name = f"{base} {k}"
            used.add(name)
            city, code = rng.pick(CITIES)
            domain = _slug(name.replace(" ASA", "").replace(" AS", "")) + ".no"
            empty = rng.random() < 0.05
            orgs.append(
                _Org(
                    name=name,
                    core=core.lower(),
                    org_nr=str(rng.randrange(800_000_000, 1_000_000_000)),
                    website=None if empty else f"https://www.{domain}",
                    description=rng.pick(DESCRIPTIONS).format(core=core.lower(), name=name),
                    active=rng.random() < 0.9,
                    street=None if empty else f"{rng.pick(STREETS)} {rng.randint(1, 120)}",
                    post_code=(code + f"{rng.below(10_000):04d}")[:4],
                    city=city,
                    country=rng.pick(COUNTRIES),
                    domain=domain,
                )
            )
        return orgs

    @staticmethod
    def _phone(rng: _Rng, mobile: bool) -> str:
        if mobile:
            digits = f"{rng.pick('49')}{rng.below(10_000_000):07d}"
        else:
            digits = f"{rng.pick(('22', '23', '55', '73', '51', '38'))}{rng.below(1_000_000):06d}"
        style = rng.random()
        if style < 0.6:
            return f"+47 {digits[:3]} {digits[3:5]} {digits[5:]}"
        if style < 0.85:
            return f"+47{digits}"
        return digits

    def _people(self, rng: _Rng, count: int, local_format: str) -> list[_Person]:
        """``count`` people; e-mails unique among themselves and against the shared ones.

        Each side's own people use a different local-part format, so one side's own people
        never collide with the other side's by accident.
        """
        used: set[str] = set(getattr(self, "shared_emails", ()))
        people: list[_Person] = []
        orgs = self.orgs
        for _ in range(count):
            first, last = rng.pick(FIRST_NAMES), rng.pick(LAST_NAMES)
            domain = rng.pick(orgs).domain if rng.random() < 0.7 else rng.pick(MAIL_DOMAINS)
            slug_first, slug_last = _slug(first), _slug(last)
            local = local_format.format(f=slug_first, l=slug_last, i=slug_first[0])
            email, k = f"{local}@{domain}", 1
            while email in used:
                k += 1
                email = f"{local}{k}@{domain}"
            used.add(email)
            people.append(
                _Person(
                    first=first,
                    last=last,
                    email=email,
                    phone=None if rng.random() < 0.08 else self._phone(rng, mobile=False),
                    mobile=None if rng.random() < 0.1 else self._phone(rng, mobile=True),
                    title=None if rng.random() < 0.06 else rng.pick(TITLES),
                )
            )
        return people

    @staticmethod
    def _stamps(rng: _Rng) -> tuple[str, str]:
        created = _SEED_NOW_US - rng.below(_YEAR_US)
        modified = min(_SEED_NOW_US - 1, created + rng.below(_MONTH_US))
        return _stamp(created), _stamp(modified)

    def _employer_shared(self, i: int) -> int:
        """A shared person's employer: the same shared organisation on both sides."""
        return (i * 7919) % self.shared_p

    # -- Custom CRM ------------------------------------------------------------------------
    def custom_products(self) -> list[dict[str, Any]]:
        rng = self._rng("custom-products")
        out = []
        for i in range(self.p):
            org = self.orgs[i]  # 0..shared_p-1 shared, then Custom-CRM-only organisations
            created, modified = self._stamps(rng)
            out.append(
                {
                    "Id": custom_id(CUSTOM_PRODUCT_PREFIX, i + 1),
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

    def custom_contacts(self) -> list[dict[str, Any]]:
        rng = self._rng("custom-contacts")
        own = self._people(self._rng("custom-people"), self.n - self.shared_c, "{f}.{l}")
        people = self.shared_people + own
        out = []
        for i in range(self.n):
            person = people[i]
            if rng.random() < 0.1:
                product = None
            elif i < self.shared_c:
                product = custom_id(CUSTOM_PRODUCT_PREFIX, self._employer_shared(i) + 1)
            else:
                product = custom_id(CUSTOM_PRODUCT_PREFIX, rng.below(self.p) + 1)
            created, modified = self._stamps(rng)
            out.append(
                {
                    "Id": custom_id(CUSTOM_CONTACT_PREFIX, i + 1),
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

    # -- CRMOffice ---------------------------------------------------------------------------
    def office_companies(self) -> list[dict[str, Any]]:
        rng = self._rng("office-companies")
        only = self.p - self.shared_p  # CRMOffice-only companies, some become duplicates
        n_dupes = min(only, max(1, self.p // 100)) if self.p >= 3 else 0
        dupes = {self.p - 1 - k for k in range(n_dupes)}
        out = []
        for j in range(self.p):
            org = self.orgs[j if j < self.shared_p else self.p + (j - self.shared_p)]
            name, website, description, active = org.name, org.website, org.description, org.active
            if j < self.shared_p:
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
                name = self.orgs[(self.p - 1 - j) % self.shared_p].name
            created, modified = self._stamps(rng)
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
                    "id": office_id(OFFICE_COMPANY_START + j),
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

    def office_contacts(self) -> list[dict[str, Any]]:
        rng = self._rng("office-contacts")
        own = self._people(self._rng("office-people"), self.n - self.shared_c, "{i}.{l}")
        people = self.shared_people + own
        only = self.n - self.shared_c
        n_dupes = min(only, max(1, self.n // 200)) if self.n >= 3 and self.shared_c else 0
        dupes = {self.n - 1 - k for k in range(n_dupes)}
        out = []
        for j in range(self.n):
            person = people[j]
            email, title, phone, mobile = person.email, person.title, person.phone, person.mobile
            if j < self.shared_c:
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
                    phone = self._phone(rng, mobile=False)  # conflicting phone
                elif roll < 0.09:
                    mobile = None  # empty on this side
                company_index = self._employer_shared(j)
            else:
                if j in dupes:
                    # ambiguous: a second CRMOffice contact with a shared person's e-mail
                    email = self.shared_people[(self.n - 1 - j) % self.shared_c].email
                company_index = rng.below(self.p)
            company = (
                None
                if rng.random() < 0.1
                else {"id": office_id(OFFICE_COMPANY_START + company_index)}
            )
            created, modified = self._stamps(rng)
            out.append(
                {
                    "id": office_id(OFFICE_CONTACT_START + j),
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


def demo_records(system: str, n: int) -> dict[str, list[dict[str, Any]]]:
    """The seeded records of one CRM as API documents, by object name (parents first)."""
    if n <= 0:
        return {}
    world = _World(n)
    if system == "custom-crm":
        return {"products": world.custom_products(), "contacts": world.custom_contacts()}
    if system == "crm-office":
        return {"companies": world.office_companies(), "contacts": world.office_contacts()}
    raise ValueError(f"unknown system {system!r}")
