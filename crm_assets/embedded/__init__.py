"""The machinery every embedded CRM shares (FastAPI + SQLite), for the demo, tests and benchmarks.

Each CRM's own service lives in its folder (``crm_assets/<crm>/service.py``) and is found
through the connector registry. ``create_app(system, data_dir, ...)`` builds one as an ASGI
app; ``run_service(...)`` serves it on 127.0.0.1 (what ``crm-assets serve`` and
``python -m crm_assets.embedded`` call). The names below are imported on first use, so
that importing a submodule (``crm_assets.embedded.seed``, ``.errors``) does not import
FastAPI and the registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crm_assets.embedded.service import SYSTEMS, EmbeddedService, create_app, run_service

__all__ = ["SYSTEMS", "EmbeddedService", "create_app", "run_service"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from crm_assets.embedded import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
