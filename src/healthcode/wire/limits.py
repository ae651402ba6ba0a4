"""The rows-per-request limit, checked where requests are decoded (row form, Arrow IPC, ingest rows).

Set once at a server's start-up by :func:`configure` (one server per process); the default (no limit) is what
in-process users of the wire get.  Past the limit the call ends with RESOURCE_EXHAUSTED and a message naming it.
"""

from __future__ import annotations

from healthcode.errors import Exhausted

#: Rows one request may carry (row-form persons, one Arrow IPC message, one ingest request); 0: no limit.
_max_request_rows = 0


class LimitExceeded(Exhausted):
    """A request is over a configured limit: the call ends with RESOURCE_EXHAUSTED and this message."""


def configure(max_request_rows: int) -> None:
    global _max_request_rows
    _max_request_rows = max_request_rows


def check_rows(rows: int, what: str) -> None:
    """Raise :class:`LimitExceeded` when ``rows`` is over the rows-per-request limit."""
    limit = _max_request_rows
    if limit and rows > limit:
        raise LimitExceeded(
            f"{what}: more rows than the server's limit of {limit:,} rows per request (max_request_rows); "
            "split the work into smaller requests"
        )
