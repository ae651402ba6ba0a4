"""The exceptions a caller can act on.  Each message names what is wrong and where (file, line, key, column)."""

from __future__ import annotations


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
