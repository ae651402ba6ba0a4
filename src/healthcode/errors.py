"""The exceptions a caller can act on.  Each message names what is wrong and where (file, line, key, column)."""

from __future__ import annotations

import os


class HealthcodeError(ValueError):
    """Base class of every error this package raises for bad input."""


class SchemaError(HealthcodeError):
    """The population (or another Arrow input) does not have the SPEC schema: names the column."""


class PolicyError(HealthcodeError):
    """A policy TOML file is invalid: names the file and the key."""


class RiskListError(HealthcodeError):
    """A risk list is invalid: names the line (or row) and the field.  The whole list is rejected."""


class CorruptDataError(HealthcodeError):
    """Arrow data whose buffers are inconsistent (e.g. list offsets out of range): names the column."""


class StoreError(HealthcodeError):
    """The population store refused a call: names the row (0-based, within the call) and the column, or the file.

    Nothing of the failing call is stored.
    """


class StoreUnavailable(StoreError):
    """The store could not carry out a write or read that was otherwise fine (disk full, a read-only or damaged
    file, an I/O error): not the caller's fault; retry later or elsewhere (UNAVAILABLE)."""


def read_text(path: str | os.PathLike[str], error: type[HealthcodeError], what: str) -> str:
    """A UTF-8 text file's contents; ``error`` names the file if it cannot be read."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
