"""The connector protocol: what the sync needs to know of, and to do with, one CRM.

Below both the sync layer and the CRM folders. A connector declares its
system name (as dataflow documents spell it), its objects and their fields, its
write capabilities, its settings and secrets, and how to build a client and its
embedded service. The sync is given a connector per side of a flow and never
asks which CRM it is (see ``crm_assets/README.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from crm_assets.engine.objects import SourceObject
from crm_assets.http import RetryPolicy


@dataclass(frozen=True)
class Setting:
    """One environment variable a connector reads; ``role`` says what the client gets it as."""

    name: str
    default: str
    description: str
    role: Literal["base_url", "account", "secret", "rate_limit", "other"] = "other"

    @property
    def secret(self) -> bool:
        return self.role == "secret"


@dataclass(frozen=True)
class WriteCapabilities:
    """How a CRM takes writes, so the sync can plan calls without knowing which CRM it is."""

    batch_size: int  # items per write call (1: single calls)
    parallel_calls: int  # calls that may run at once
    partial_update: bool  # PATCH of the changed fields (False: full replace of the record)
    concurrency_token: str | None  # the field sent as If-Match (None: no optimistic locking)
    idempotent_creates: bool  # a create carries a key the CRM honours (retry-safe)


@dataclass(frozen=True)
class Update:
    """One record's changes. ``current`` is the record as last read (flat, dotted keys):
    a CRM that replaces whole records sends it with the changes applied."""

    id: str
    version: str | None
    changes: Mapping[str, Any]
    current: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Create:
    """One record to create; ``key`` is the stored intent's key (an idempotency key)."""

    key: str
    values: Mapping[str, Any]


@dataclass(frozen=True)
class Outcome:
    """What a CRM said of one item of a write.

    ``ok``: done (``id`` of the record); ``conflict``: the record changed since it
    was read (412): re-read and re-merge; ``failed``: refused (``message``);
    ``unknown``: the answer was lost after the call may have landed (a create's
    intent stays pending and is resolved by lookup).
    """

    status: Literal["ok", "conflict", "failed", "unknown"]
    id: str | None = None
    message: str | None = None
    #: the record's modification time as the CRM stamped this write (for the sensors to
    #: tell the sync's own writes from users' edits)
    stamp: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class CrmClient(Protocol):
    """The calls the sync makes on a CRM; one instance per run, used as a context manager."""

    system: str

    def pages(
        self, obj: str, since: datetime | None = None, size: int | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """Every record (deleted ones included) modified since ``since``, page by page."""
        ...

    def get(self, obj: str, record_id: str) -> dict[str, Any]: ...

    def update_records(self, obj: str, updates: Sequence[Update]) -> list[Outcome]: ...

    def create_records(self, obj: str, creates: Sequence[Create]) -> list[Outcome]: ...

    def delete(self, obj: str, record_id: str) -> None: ...

    def clock_offset(self) -> float | None:
        """The CRM's clock minus ours (seconds) as its answers said; None before any."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> CrmClient: ...

    def __exit__(self, *exc: object) -> None: ...


@dataclass(frozen=True)
class ClientSettings:
    """The values a client is built from (read from the connector's settings)."""

    base_url: str
    account: str = ""
    secret: str = ""
    rate_limit: float | None = None
    timeout: float = 30.0
    retry: RetryPolicy | None = None


@dataclass(frozen=True)
class Connector:
    """Everything the project knows of one CRM."""

    system: str  # as dataflow documents spell it, e.g. "CRMOffice"
    key: str  # as asset keys and resources name it, e.g. "crm_office"
    slug: str  # as ``crm-assets serve`` names it, e.g. "crm-office"
    objects: tuple[SourceObject, ...]
    settings: tuple[Setting, ...]
    capabilities: WriteCapabilities
    client: Callable[[ClientSettings], CrmClient]
    #: The embedded service's builder as ``"package.module:function"``, imported only when
    #: a service is built (so FastAPI is not imported with the connector):
    #: ``build_service(data_dir, faults, clock=..., **options) -> EmbeddedService`` (see
    #: ``crm_assets/embedded/service.py``; options the CRM does not know are ignored). The
    #: module also offers ``demo_records(n)``, the service's ``--seed n`` records.
    service: str

    def object_for(self, entity: str) -> SourceObject | None:
        """The object a document's entity name stands for (case and spacing ignored)."""
        wanted = normalize_name(entity)
        for obj in self.objects:
            if wanted in {normalize_name(obj.entity), normalize_name(obj.obj)}:
                return obj
        return None

    def setting(self, role: str) -> Setting | None:
        return next((s for s in self.settings if s.role == role), None)

    def client_settings(
        self, environ: Mapping[str, str], retry: RetryPolicy | None = None
    ) -> ClientSettings:
        """The client's settings from an environment (unset names take their defaults)."""

        def value(role: str) -> str:
            s = self.setting(role)
            return (environ.get(s.name) or s.default) if s else ""

        rate = value("rate_limit")
        return ClientSettings(
            base_url=value("base_url"),
            account=value("account"),
            secret=value("secret"),
            rate_limit=float(rate) if rate and float(rate) > 0 else None,
            retry=retry,
        )


def normalize_name(name: str) -> str:
    """System and entity names compare ignoring case and spacing ("CRM Office" is "CRMOffice")."""
    return "".join(name.split()).casefold()
