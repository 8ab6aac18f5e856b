"""The data folder the sync writes to, local or on S3: one small API over ``obstore``.

``CRM_SYNC_DATA_URL`` names it (``s3://bucket/prefix`` or a path; the local
``CRM_SYNC_DATA_DIR`` by default). Every write puts one whole object: a local
write goes to a temporary file renamed into place and an S3 PUT replaces the
object at once, so a reader sees the old or the new object, never half of one.
S3 credentials, region and endpoint come from the usual ``AWS_*`` variables.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import obstore
import polars as pl
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import LocalStore, ObjectStore, S3Store

if TYPE_CHECKING:
    from obstore.store import RetryConfig
    from polars._typing import ParquetCompression

#: What a failure to reach the data folder tells the operator to check.
STORAGE_HINT = "check CRM_SYNC_DATA_URL and the AWS_* settings"

#: A bucket that does not answer fails within this time, not after minutes of retries.
RETRY: RetryConfig = {"max_retries": 3, "retry_timeout": timedelta(seconds=30)}

#: What a missing object raises: S3's kind, and a local folder's (Python's own).
MISSING = (NotFoundError, FileNotFoundError)


class StorageError(RuntimeError):
    """The data folder cannot be read or written: one line naming the setting."""


@dataclass(frozen=True)
class Storage:
    """A folder of the data folder: ``key``s are ``/``-separated paths below it."""

    store: ObjectStore
    url: str
    prefix: str = ""

    @classmethod
    def at(cls, url: str | Path) -> Storage:
        """The data folder at an ``s3://`` URL or a local path (created when missing)."""
        text = str(url)
        if text.startswith("s3://"):
            endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
            try:
                store: ObjectStore = S3Store.from_url(
                    text,
                    client_options={"allow_http": endpoint.startswith("http://")},
                    retry_config=RETRY,
                )
            except (BaseError, ValueError) as exc:
                raise StorageError(f"cannot use {text}: {_reason(exc)} ({STORAGE_HINT})") from None
            return cls(store, text.rstrip("/"))
        path = Path(text).resolve()
        return cls(LocalStore(path, mkdir=True, automatic_cleanup=True), str(path))

    def child(self, *parts: str) -> Storage:
        """A folder below this one."""
        return Storage(self.store, self.url, self.key(*parts))

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def uri(self, *parts: str) -> str:
        """Where an object is, as an operator finds it (a path or an ``s3://`` URL)."""
        return "/".join(p for p in (self.url, self.key(*parts)) if p)

    def read_bytes(self, *parts: str) -> bytes | None:
        """An object's content, or None when there is none."""
        try:
            return obstore.get(self.store, self.key(*parts)).bytes().to_bytes()
        except MISSING:
            return None
        except BaseError as exc:
            raise self._error("read", parts, exc) from None

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Replace an object whole."""
        try:
            obstore.put(self.store, self.key(*parts), data)
        except BaseError as exc:
            raise self._error("write", parts, exc) from None

    def read_text(self, *parts: str) -> str | None:
        data = self.read_bytes(*parts)
        return None if data is None else data.decode()

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def read_parquet(self, *parts: str) -> pl.DataFrame | None:
        data = self.read_bytes(*parts)
        return None if data is None else pl.read_parquet(io.BytesIO(data))

    def write_parquet(
        self,
        frame: pl.DataFrame,
        *parts: str,
        metadata: dict[str, str] | None = None,
        compression: ParquetCompression = "zstd",
    ) -> None:
        buffer = io.BytesIO()
        frame.write_parquet(buffer, compression=compression, metadata=metadata)
        self.write_bytes(buffer.getvalue(), *parts)

    def modified(self, *parts: str) -> float | None:
        """When an object was last written (epoch seconds), or None when there is none."""
        try:
            return obstore.head(self.store, self.key(*parts))["last_modified"].timestamp()
        except MISSING:
            return None
        except BaseError as exc:
            raise self._error("read", parts, exc) from None

    def exists(self, *parts: str) -> bool:
        return self.modified(*parts) is not None

    def delete(self, *parts: str) -> None:
        """Remove an object, if there is one."""
        try:
            obstore.delete(self.store, self.key(*parts))
        except MISSING:
            pass
        except BaseError as exc:
            raise self._error("write", parts, exc) from None

    def folders(self) -> Iterator[tuple[str, float, list[str]]]:
        """Each sub-folder's name, newest write (epoch seconds) and object keys."""
        found: dict[str, tuple[float, list[str]]] = {}
        prefix = f"{self.prefix}/" if self.prefix else ""
        for key, written in self.objects():
            name, sep, _rest = key.removeprefix(prefix).partition("/")
            if sep:
                newest, keys = found.get(name, (0.0, []))
                keys.append(key)
                found[name] = (max(newest, written), keys)
        for name, (newest, keys) in found.items():
            yield name, newest, keys

    def objects(self) -> Iterator[tuple[str, float]]:
        """Each object below this folder: its full key and when it was written."""
        prefix = f"{self.prefix}/" if self.prefix else None
        try:
            for batch in obstore.list(self.store, prefix):
                for meta in batch:
                    yield meta["path"], meta["last_modified"].timestamp()
        except BaseError as exc:
            raise self._error("read", (), exc) from None

    def remove_keys(self, keys: list[str]) -> None:
        """Remove objects by their full keys (as :meth:`folders` lists them)."""
        try:
            obstore.delete(self.store, keys)
        except BaseError as exc:
            raise self._error("write", (), exc) from None

    def check(self) -> None:
        """Fail now, in one line, when the data folder cannot be listed."""
        try:
            next(iter(obstore.list(self.store, self.prefix or None, chunk_size=1)), None)
        except BaseError as exc:
            raise self._error("reach", (), exc) from None

    def _error(self, verb: str, parts: tuple[str, ...], exc: BaseError) -> StorageError:
        return StorageError(f"cannot {verb} {self.uri(*parts)}: {_reason(exc)} ({STORAGE_HINT})")


def _reason(exc: Exception) -> str:
    """An object store error in a few words: S3's own code (``NoSuchBucket``, ...) when
    it sent one, else the first line (the rest is a debug dump)."""
    text = str(exc)
    code = re.search(r"<Code>(\w+)</Code>", text)
    return code.group(1) if code else text.strip().split("\n", 1)[0][:200]
