"""Both CRMs as embedded HTTP services (FastAPI + SQLite), for the demo, tests and benchmarks.

``create_app(system, data_dir, ...)`` builds one as an ASGI app; ``run_service(...)`` serves
it on 127.0.0.1 (what ``crm-assets serve`` and ``python -m crm_assets.embedded`` call).
"""

from crm_assets.embedded.service import SYSTEMS, create_app, run_service

__all__ = ["SYSTEMS", "create_app", "run_service"]
