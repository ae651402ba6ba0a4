"""The one error hierarchy: every error a caller can act on, each with the status it stands for.

Each message names what is wrong and where (file, line, key, column, row, RPC) and never quotes row content.
:class:`HealthcodeError` is the base of them all; its :attr:`~HealthcodeError.status` (a gRPC status code name,
kept as a string so this module needs no gRPC) says which kind of failure it is.  The service turns an error into
that status in one place (:mod:`healthcode.service.status`); the command line prints the message and exits 1
(2 for a :class:`UsageError`: the command was given wrongly, not its input).

=====================  =====================  =============================================================
class                  status                 meaning
=====================  =====================  =============================================================
:class:`BadInput`      INVALID_ARGUMENT       the input is wrong (a file, a column, a field, a request)
:class:`UsageError`    INVALID_ARGUMENT       a flag or setting is of the wrong form, or flags that do not go together
:class:`NotFound`      NOT_FOUND              what the call names does not exist
:class:`Precondition`  FAILED_PRECONDITION    the call cannot work in this setup (e.g. a server without store)
:class:`Exhausted`     RESOURCE_EXHAUSTED     over a limit, or a queue is full: retry later with back-off
:class:`Unavailable`   UNAVAILABLE            not the caller's fault (disk full, shutting down): retry
:class:`Expired`       DEADLINE_EXCEEDED      the caller's deadline passed before the work was done
:class:`Unauthenticated`  UNAUTHENTICATED     the caller did not prove who it is
:class:`PermissionDenied`  PERMISSION_DENIED  the caller may not make this call
=====================  =====================  =============================================================
"""

from __future__ import annotations

import os


class HealthcodeError(ValueError):
    """Base class of every deliberate error of this package.  Subclasses of :class:`BadInput` are bad input; the
    others say their kind in :attr:`status`.  (A ``ValueError`` for compatibility: bad input was one before.)"""

    #: The gRPC status code name this error stands for.
    status: str = "INVALID_ARGUMENT"


class BadInput(HealthcodeError):
    """The input is wrong: the message says what and where."""


class UsageError(BadInput):
    """How a command or the server was started is wrong: a flag, an environment variable or a config key of the
    wrong form (an instant without an offset, a negative count), or settings that do not go together.  The
    message names the flag or setting; the command line exits 2 for it."""


class NotFound(HealthcodeError):
    """What the call names does not exist."""

    status = "NOT_FOUND"


class Precondition(HealthcodeError):
    """The call cannot work in the server's current setup (e.g. it needs a store and the server has none)."""

    status = "FAILED_PRECONDITION"


class Exhausted(HealthcodeError):
    """Over a configured limit, or a queue is full: retry later with back-off."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(HealthcodeError):
    """The work could not be carried out now, through no fault of the caller: retry later or elsewhere."""

    status = "UNAVAILABLE"


class Expired(HealthcodeError):
    """The caller's deadline passed before the work was done."""

    status = "DEADLINE_EXCEEDED"


class Unauthenticated(HealthcodeError):
    """The caller did not prove who it is (no or an unknown token or certificate)."""

    status = "UNAUTHENTICATED"


class PermissionDenied(HealthcodeError):
    """The caller is known but its roles do not allow this call."""

    status = "PERMISSION_DENIED"


class SchemaError(BadInput):
    """The population (or another Arrow input) does not have the SPEC schema: names the column."""


class PolicyError(BadInput):
    """A policy TOML file is invalid: names the file and the key."""


class RiskListError(BadInput):
    """A risk list is invalid: names the line (or row) and the field.  The whole list is rejected."""


class CorruptDataError(BadInput):
    """Arrow data whose buffers are inconsistent (e.g. list offsets out of range): names the column."""


class StoreError(BadInput):
    """The population store refused a call: names the row (0-based, within the call) and the column, or the file.

    Nothing of the failing call is stored.
    """


class StoreUnavailable(Unavailable, StoreError):
    """The store could not carry out a write or read that was otherwise fine (disk full, a read-only or damaged
    file, an I/O error): not the caller's fault; retry later or elsewhere (UNAVAILABLE)."""


class StoreInUse(StoreUnavailable):
    """Another process has the store file open (one process at a time may: a running server, another command):
    names the file and, when known, the process."""


def read_text(path: str | os.PathLike[str], error: type[HealthcodeError], what: str) -> str:
    """A UTF-8 text file's contents; ``error`` names the file if it cannot be read."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
