"""The time base of SPEC §2: instants are whole seconds since the epoch; local time is fixed UTC+08:00."""

from __future__ import annotations

import datetime as _dt
import math

OFFSET_SECONDS = 8 * 3600  # Asia/Shanghai, no daylight saving since 1991
DAY_SECONDS = 86400
BEIJING = _dt.timezone(_dt.timedelta(seconds=OFFSET_SECONDS), "Asia/Shanghai")
_EPOCH_DATE = _dt.date(1970, 1, 1)


def day(t: int) -> int:
    """Local calendar day of instant ``t`` as days since 1970-01-01 (equals Arrow ``date32``)."""
    return (t + OFFSET_SECONDS) // DAY_SECONDS


def midnight(d: int) -> int:
    """The instant at which local day ``d`` starts."""
    return d * DAY_SECONDS - OFFSET_SECONDS


def date_to_day(d: _dt.date) -> int:
    return (d - _EPOCH_DATE).days


def day_to_date(d: int) -> _dt.date:
    return _EPOCH_DATE + _dt.timedelta(days=d)


def to_instant(value: _dt.datetime | int | float | str) -> int:
    """Epoch seconds (floored) from an aware datetime, an ISO-8601 string with an offset, or a number.

    A naive datetime or a string without an offset is rejected: it is never silently taken as local or UTC.
    """
    if isinstance(value, bool):
        raise TypeError(
            "as_of must be an aware datetime, an ISO-8601 string with an offset, or epoch seconds"
        )
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"as_of must be finite, got {value}")
        return math.floor(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = _dt.datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
        except ValueError:
            raise ValueError(
                f"cannot parse {value!r} as an ISO-8601 instant; expected e.g. 2021-11-30T12:00:00+08:00"
            ) from None
        value = parsed
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"{value.isoformat()} has no UTC offset; give one explicitly, e.g. +08:00 for Beijing time"
            )
        delta = value - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
        return delta.days * DAY_SECONDS + delta.seconds  # floors the microseconds away
    raise TypeError(
        f"as_of must be an aware datetime, an ISO-8601 string with an offset, or epoch seconds, "
        f"not {type(value).__name__}"
    )


def parse_given_instant(text: str) -> int:
    """Epoch seconds of an instant a person typed (a flag, a setting): ISO-8601 with an offset (``Z`` or
    ``+08:00``).  Raises ValueError saying what to write instead, quoting the text as given; the caller names
    the option."""
    stripped = text.strip()
    try:
        parsed = _dt.datetime.fromisoformat(stripped[:-1] + "+00:00" if stripped.endswith("Z") else stripped)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as an instant; write ISO-8601 with an offset, e.g. "
                         "2021-11-30T12:00:00+08:00") from None  # fmt: skip
    if parsed.utcoffset() is None:
        raise ValueError(f"{stripped} has no UTC offset; write {parsed.replace(tzinfo=BEIJING).isoformat()}")
    return to_instant(parsed)


def to_datetime(t: int) -> _dt.datetime:
    """Instant ``t`` as an aware datetime in Beijing time (for messages and display)."""
    return _dt.datetime.fromtimestamp(t, BEIJING)
