"""The one mapping from an exception to the gRPC status (code and message) a caller sees.

A :class:`~healthcode.errors.HealthcodeError` ends the call with the code its ``status`` names and its message; a
``MemoryError`` with RESOURCE_EXHAUSTED; anything else with INTERNAL and a message that names no exception class
(the class goes to the server log only).  The interceptor (:mod:`healthcode.service.interceptors`) maps every
servicer and guard failure here, and the front takes its own refusals' codes from here too.
"""

from __future__ import annotations

import logging

import grpc

from healthcode import logs
from healthcode.errors import HealthcodeError

log = logging.getLogger("healthcode.rpc")

OUT_OF_MEMORY = "the server ran out of memory for this request; send smaller batches"
INTERNAL = "internal error; the server log has the time"


class Cancelled(HealthcodeError):
    """The caller cancelled the call (it never reads the message; the code is for the log and the metrics)."""

    status = "CANCELLED"


def code_of(exc: HealthcodeError) -> grpc.StatusCode:
    """The status code a deliberate error stands for (an unknown status name is INTERNAL)."""
    return grpc.StatusCode.__members__.get(exc.status, grpc.StatusCode.INTERNAL)


def of(exc: BaseException, method: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and message for ``exc``, raised while serving ``method``; an unexpected exception is logged
    (its class only: a message could quote row content) and answered INTERNAL."""
    if isinstance(exc, HealthcodeError):
        return code_of(exc), str(exc)
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, OUT_OF_MEMORY
    logs.event(log, "rpc_error", level=logging.ERROR, method=method, error=type(exc).__name__)
    return grpc.StatusCode.INTERNAL, INTERNAL
