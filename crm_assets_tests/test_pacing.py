"""A client told the CRM's rate limit paces itself instead of being throttled."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from crm_assets.crm_office.client import CrmOfficeClient
from crm_assets.custom_crm.client import CustomCrmClient


def throttled(service) -> int:
    return service.log().count('" 429')


def test_paced_clients_stay_under_the_limit_from_many_threads(embedded_service_factory):
    custom = embedded_service_factory("custom-crm", rate_limit=10)
    office = embedded_service_factory("crm-office", rate_limit=10)
    started = time.monotonic()
    with (
        CustomCrmClient(custom.base_url, custom.credentials["api_key"], rate_limit=10) as a,
        CrmOfficeClient(office.base_url, **office.credentials, rate_limit=10) as b,
        ThreadPoolExecutor(max_workers=8) as pool,
    ):
        made = list(
            pool.map(lambda i: a.create("contacts", {"Email": f"p{i}@example.com"}), range(25))
        )
        list(pool.map(lambda i: b.create("contacts", {"email": f"p{i}@example.com"}), range(25)))
    elapsed = time.monotonic() - started
    assert len({m["Id"] for m in made}) == 25
    # 25 calls at 10/s with a 10-call window: at least ~1.5 s, and never throttled
    assert elapsed >= 1.4
    assert throttled(custom) == 0 and throttled(office) == 0
