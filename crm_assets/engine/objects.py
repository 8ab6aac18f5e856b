"""What the engine knows of one CRM object: its fields and which of them play which role.

Plain data: each connector declares its objects (``crm_assets/<crm>/fields.py``), the engine reads it.
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
    def server_fields(self) -> frozenset[str]:
        """The fields the CRM manages itself: never written."""
        roles = (self.id_field, self.modified_field, self.created_field, self.version_field)
        return frozenset(f for f in (*roles, self.deleted_field) if f)

    @property
    def asset_path(self) -> list[str]:
        return [self.system_key, self.obj]


@dataclass(frozen=True)
class FieldRoles:
    """Which fields play the id / modified / created / version / soft-delete roles in every
    object of one CRM: a connector declares them once and builds its objects from them."""

    system: str
    system_key: str
    id_field: str
    modified_field: str
    created_field: str
    version_field: str
    deleted_field: str | None

    def object(
        self, entity: str, obj: str, fields: dict[str, str], references: dict[str, str]
    ) -> SourceObject:
        return SourceObject(
            system=self.system,
            system_key=self.system_key,
            entity=entity,
            obj=obj,
            id_field=self.id_field,
            modified_field=self.modified_field,
            created_field=self.created_field,
            version_field=self.version_field,
            deleted_field=self.deleted_field,
            fields=fields,
            references=references,
        )
