"""The log lines (healthcode.logs): the direct path writes what logging would, per-call lines are batched but keep
their order and reach the stream within FLUSH_SECONDS, other lines are written at once, nothing is lost at exit."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import time

import pytest

from healthcode import logs

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) healthcode\.rpc (\{.*\})$")


@pytest.fixture
def stream():
    """The configured handler writing to a StringIO.  pytest's log capture adds its handlers to loggers for each
    phase of a test; :func:`ours` leaves only the configured one (as a server has it) for the test's own phase."""
    saved = logs.ROOT.handlers[:], logs.ROOT.level, logs.ROOT.propagate
    logs.configure("info")
    out = io.StringIO()
    logs.ROOT.handlers[0].setStream(out)
    yield out
    logs.ROOT.handlers[:] = saved[0]
    logs.ROOT.setLevel(saved[1])
    logs.ROOT.propagate = saved[2]


def ours() -> None:
    logs.ROOT.handlers[:] = [h for h in logs.ROOT.handlers if type(h) is logs.LineHandler]


def test_direct_lines_are_the_lines_logging_writes(stream):
    ours()
    log = logging.getLogger("healthcode.rpc")
    logs.event(log, "rpc", method="Evaluate", rows=1, ms=0.5, code="OK")
    log.info(json.dumps({"event": "rpc", "method": "Evaluate", "rows": 1, "ms": 0.5, "code": "OK"}))
    first, second = stream.getvalue().splitlines()
    assert LINE.match(first) and LINE.match(second)
    assert first.split(" ", 2)[2] == second.split(" ", 2)[2]  # all but the timestamp


def test_call_lines_are_batched_in_order_and_flushed_by_the_next_other_line(stream):
    ours()
    log = logging.getLogger("healthcode.rpc")
    for k in range(5):
        logs.call_event(log, "rpc", k=k)
    assert stream.getvalue() == ""  # batched
    logs.event(log, "refused", level=logging.WARNING, k=5)  # written at once, after the batched ones
    records = [json.loads(LINE.match(line).group(2)) for line in stream.getvalue().splitlines()]
    assert [r["k"] for r in records] == [0, 1, 2, 3, 4, 5]


def test_a_batch_is_written_once_it_is_due(stream):
    ours()
    log = logging.getLogger("healthcode.rpc")
    logs.call_event(log, "rpc", k=1)
    logs.flush_due()
    assert stream.getvalue() == ""  # not due yet
    time.sleep(logs.FLUSH_SECONDS * 1.5)
    logs.flush_due()  # what the server's loop does every FLUSH_SECONDS
    assert '"k": 1' in stream.getvalue()
    logs.call_event(log, "rpc", k=2)
    time.sleep(logs.FLUSH_SECONDS * 1.5)
    logs.call_event(log, "rpc", k=3)  # finds the batch due: writes it, itself included
    assert '"k": 2' in stream.getvalue() and '"k": 3' in stream.getvalue()


def test_level_off_writes_nothing(stream):
    ours()
    logs.ROOT.setLevel(logging.WARNING)
    logs.call_event(logging.getLogger("healthcode.rpc"), "rpc", k=1)
    logs.ROOT.handlers[0].flush()
    assert stream.getvalue() == ""


def test_batched_lines_are_written_at_exit():
    code = (
        "import logging; from healthcode import logs; logs.configure('info'); "
        "[logs.call_event(logging.getLogger('healthcode.rpc'), 'rpc', k=k) for k in range(3)]"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [json.loads(LINE.match(line).group(2))["k"] for line in done.stderr.splitlines()] == [0, 1, 2]
