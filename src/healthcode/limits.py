"""Request limits: rows per request (checked where requests are decoded) and concurrent calls (per caller and
overall, checked by the :class:`~healthcode.auth.Guard` interceptor before any work starts).

Past a limit the call ends at once with RESOURCE_EXHAUSTED and a message naming the limit; nothing queues.  The
limits live in this module (one server per process) and are set once at start-up by :func:`configure`; the
defaults here (no row limit) are what in-process users of :mod:`healthcode.wire` get.
"""

from __future__ import annotations

import threading

import grpc

#: Rows one request may carry (row-form persons, one Arrow IPC message, one ingest request); 0: no limit.
_max_request_rows = 0


class LimitExceeded(Exception):
    """A request is over a configured limit: the call ends with RESOURCE_EXHAUSTED and this message."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def configure(max_request_rows: int) -> None:
    global _max_request_rows
    _max_request_rows = max_request_rows


def max_request_rows() -> int:
    return _max_request_rows


def check_rows(rows: int, what: str) -> None:
    """Raise :class:`LimitExceeded` when ``rows`` is over the rows-per-request limit."""
    limit = _max_request_rows
    if limit and rows > limit:
        raise LimitExceeded(
            f"{what}: more rows than the server's limit of {limit:,} rows per request (max_request_rows); "
            "split the work into smaller requests"
        )


class Concurrency:
    """Counts calls in flight, overall and per caller.  ``max_total`` / ``max_per_caller`` of 0 mean no limit.

    :meth:`acquire` never waits: it takes a slot or raises :class:`LimitExceeded` naming the limit that is full.
    Used from the event loop; the lock only guards against a done-callback running on another thread."""

    def __init__(self, max_total: int, max_per_caller: int) -> None:
        self.max_total = max_total
        self.max_per_caller = max_per_caller
        self.total = 0
        self.by_caller: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, caller: str) -> None:
        with self._lock:
            mine = self.by_caller.get(caller, 0)
            if self.max_total and self.total >= self.max_total:
                raise LimitExceeded(
                    f"the server is at its limit of concurrent calls (max_concurrent_calls = {self.max_total}); "
                    "retry with back-off"
                )
            if self.max_per_caller and mine >= self.max_per_caller:
                raise LimitExceeded(
                    f"caller {caller!r} is at its limit of concurrent calls "
                    f"(max_concurrent_calls_per_caller = {self.max_per_caller}); retry with back-off"
                )
            self.total += 1
            self.by_caller[caller] = mine + 1

    def release(self, caller: str) -> None:
        with self._lock:
            self.total -= 1
            left = self.by_caller.get(caller, 1) - 1
            if left > 0:
                self.by_caller[caller] = left
            else:
                self.by_caller.pop(caller, None)
