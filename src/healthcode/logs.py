"""Structured log lines: one JSON object per event, written through :func:`event` (never hand-escaped f-strings).

Every line names its event and carries counts, versions, durations and identifiers of the service (method names,
status codes); never a person id, an itinerary or other row content.  The handler that prints them is set once by
:func:`configure`.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any


def event(logger: logging.Logger, name: str, /, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``{"event": name, **fields}`` as one JSON line at ``level`` (skipped cheaply when the level is off)."""
    if logger.isEnabledFor(level):
        logger.log(level, json.dumps({"event": name, **fields}, ensure_ascii=False, default=str))


def configure(level: str) -> None:
    """One line per record on stderr: a timestamp, the level, the logger and the message (JSON for events)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("healthcode")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
