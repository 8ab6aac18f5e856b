"""What the engine knows of one CRM object: its fields and which of them play which role.

Plain data: the connectors fill it in (``crm_assets.sources``), the engine reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SourceObject:
    """One API object of one CRM, e.g. Custom CRM ``contacts``."""

    system: str  # as dataflow documents name it
    system_key: str  # as asset keys and resources name it
    entity: str  # as dataflow documents name it
    obj: str  # as the API names it
    id_field: str
    modified_field: str
    created_field: str
    version_field: str
    deleted_field: str | None
    fields: dict[str, str]
    #: fields holding the id of another object of the same system: field -> object
    references: dict[str, str] = field(default_factory=dict)

    @property
    def asset_path(self) -> list[str]:
        return [self.system_key, self.obj]
