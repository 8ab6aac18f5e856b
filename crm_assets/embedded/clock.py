"""The clock of one embedded service: real time plus an adjustable offset (the clock fault).

Every "now" an embedded CRM uses goes through its service's one :class:`Clock` (held on
the app as ``app.state.clock``):

- record stamps (Created/Modified, createdAt/updatedAt, idempotency keys) come from the
  store's :class:`~crm_assets.embedded.store.StampClock`, which reads :meth:`Clock.time_ns`;
- the HTTP ``Date`` header of every response is :meth:`Clock.http_date`
  (:class:`~crm_assets.embedded.middleware.DateHeaderMiddleware`);
- bearer-token expiry deliberately stays on the real clock (:meth:`Clock.real_time`): a
  CRM whose clock is constantly off issues and checks expiries on the same wrong clock, so
  a token lives its ``expires_in`` either way; only moving the offset at run time would
  shift it, an artefact of the fault switch (a jump of one TTL would log every client out
  at once), and expiries are persisted while the offset is not (a restart sets it to 0).

``POST /_admin/clock {"offset_seconds": N}`` (a service started with faults) sets the
offset, and ``{"offset_seconds": 0}`` sets it back. ``POST /_admin/reset`` also sets it
to 0, but it wipes the CRM's data and faults too (a fresh service, reseeded if asked).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import formatdate

#: The largest offset ``/_admin/clock`` takes either way (about ten years).
MAX_OFFSET_SECONDS = 10 * 365.25 * 86_400


class Clock:
    """Real UTC time moved by ``offset_seconds`` (float, may be negative)."""

    def __init__(self, offset_seconds: float = 0.0) -> None:
        self._offset = float(offset_seconds)

    @property
    def offset_seconds(self) -> float:
        return self._offset

    def set_offset(self, seconds: float) -> None:
        """Run ``seconds`` off from now on (one float assignment: safe across threads)."""
        self._offset = float(seconds)

    def reset(self) -> None:
        self.set_offset(0.0)

    def time(self) -> float:
        """The service's "now" as epoch seconds (``time.time()`` plus the offset)."""
        return time.time() + self._offset

    def time_ns(self) -> int:
        """The service's "now" as epoch nanoseconds."""
        return time.time_ns() + round(self._offset * 1e9)

    def now(self) -> datetime:
        """The service's "now" as an aware UTC datetime."""
        return datetime.fromtimestamp(self.time(), UTC)

    def http_date(self) -> str:
        """The service's "now" as an RFC 7231 ``Date`` value (``Sun, 06 Nov 1994 08:49:37 GMT``)."""
        return formatdate(self.time(), usegmt=True)

    @staticmethod
    def real_time() -> float:
        """Epoch seconds without the offset (what token expiry is measured on)."""
        return time.time()
