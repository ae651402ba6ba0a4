"""Structured log lines: one JSON object per event, written through :func:`event` (never hand-escaped f-strings).

Every line names its event and carries counts, versions, durations and identifiers of the service (method names,
status codes); never a person id, an itinerary or other row content.  The handler that prints them is set once by
:func:`configure`.  An event of a healthcode logger that nothing else listens to is written by that handler
directly (the same line, without a LogRecord), and the per-call lines (:func:`call_event`: one per RPC, on the gateway's
path) are written in batches: each write to stderr lets another thread take the interpreter, which cost a
one-person call a sixth of its time.  A batch is written by the first line that finds it :data:`FLUSH_SECONDS`
old, by :func:`flush_due` (the server calls it from its event loop every FLUSH_SECONDS, so no line waits longer
on a quiet server), before any other line (those are written at once), and at exit.  (A thread of its own to write
them would cost more than the writes: it competes for the interpreter with the calls.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from typing import Any, TextIO

#: The logger every healthcode logger is below (its handler is :func:`configure`'s).
ROOT = logging.getLogger("healthcode")
#: The encoder of every event (one instance: json.dumps with options builds one per call).
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)
#: The longest a batched line waits to be written.
FLUSH_SECONDS = 0.05


def event(logger: logging.Logger, name: str, /, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``{"event": name, **fields}`` as one JSON line at ``level`` (skipped cheaply when the level is off)."""
    _event(logger, name, level, False, fields)


def call_event(logger: logging.Logger, name: str, /, **fields: Any) -> None:
    """:func:`event` at INFO for a line of which every call writes one: it may wait up to :data:`FLUSH_SECONDS` to
    be written with others."""
    _event(logger, name, logging.INFO, True, fields)


def _event(logger: logging.Logger, name: str, level: int, batch: bool, fields: dict[str, Any]) -> None:
    if logger.isEnabledFor(level):
        line = _ENCODER.encode({"event": name, **fields})
        handler = _direct(logger)
        if handler is None:
            logger.log(level, line)
        elif level >= handler.level:
            handler.write_line(level, logger.name, line, batch)


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """One line per record: a timestamp, the level, the logger and the message (JSON for events).

    :meth:`write_line` writes the same line as :meth:`emit` of a record would (``%(asctime)s`` to the millisecond,
    the local time of the second formatted once per second), at once or batched; lines keep their order."""

    FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.setFormatter(logging.Formatter(self.FORMAT))
        self._second = -1
        self._stamp = ""
        self._pending: list[str] = []
        self._since = 0.0  # when the oldest pending line was written
        self._pending_lock = threading.Lock()  # held only to append or take: never across a write

    def write_line(self, level: int, logger_name: str, message: str, batch: bool = False) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:  # what Formatter.formatTime does, once a second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        line = f"{self._stamp},{int((now - second) * 1000):03d} {logging.getLevelName(level)} {logger_name} {message}\n"
        if not batch:
            self._write(line)
            return
        with self._pending_lock:
            if not self._pending:
                self._since = now
            self._pending.append(line)
            due = now - self._since >= FLUSH_SECONDS
        if due:
            self._write("")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Write the batched lines, then flush the stream (logging calls this at exit)."""
        self._write("")

    def flush_due(self) -> None:
        """Write the batched lines if the oldest has waited FLUSH_SECONDS."""
        if self._pending and time.time() - self._since >= FLUSH_SECONDS:
            self._write("")

    def _write(self, line: str) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        text = "".join(pending) + line
        with self.lock:  # type: ignore[union-attr]
            try:
                if text:
                    self.stream.write(text)
                self.stream.flush()
            except Exception:  # as emit: a closed or broken stream never fails the caller
                self.handleError(logging.makeLogRecord({"msg": text.rstrip("\n")}))


def flush_due() -> None:
    """Write the per-call lines that have waited :data:`FLUSH_SECONDS` (a server calls this that often)."""
    for handler in ROOT.handlers:
        if type(handler) is LineHandler:
            handler.flush_due()


def flush() -> None:
    """Write every batched line now (before text printed to stderr beside the log, say)."""
    for handler in ROOT.handlers:
        handler.flush()


async def flush_periodically() -> None:
    """:func:`flush_due` every :data:`FLUSH_SECONDS`, for as long as the task runs (a server's event loop)."""
    while True:
        await asyncio.sleep(FLUSH_SECONDS)
        flush_due()


def _direct(logger: logging.Logger) -> LineHandler | None:
    """The configured handler, when it is the only thing that would see ``logger``'s records: a healthcode logger
    right below :data:`ROOT` with no handlers or filters of its own, ROOT with only the handler and no filter."""
    if logger.parent is not ROOT or logger.handlers or logger.filters or not logger.propagate or ROOT.filters:
        return None
    handlers = ROOT.handlers
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    return handler if type(handler) is LineHandler and not handler.filters else None


def configure(level: str) -> None:
    """One line per record on stderr: a timestamp, the level, the logger and the message (JSON for events)."""
    for old in ROOT.handlers:
        old.flush()
    ROOT.handlers[:] = [LineHandler(sys.stderr)]
    ROOT.setLevel(level.upper())
    ROOT.propagate = False
