"""Fuzz the row-form gateway path: raw EvaluateRequest bytes into the kernel's protobuf codec, then evaluation.

The sequence is the servicer's own (``HealthCodeService._evaluate_rows``: ``wire.decode_request``, the context,
the kernel, ``wire.encode_output``).  When Google's protobuf runtime also reads the bytes, the kernel's decode must
agree with it field by field (merging of repeated singular fields included); small requests are also evaluated by
the reference path (``HEALTHCODE_REFERENCE``), whose response must be the same, and answered by the one-pass path
of small requests (``wire.SmallRequests``), whose response bytes, or refusal, must be the general path's.

    .venv/bin/python fuzz/fuzz_rowform.py fuzz/corpus/rowform -max_total_time=300 -timeout=10
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


from _instrument import instrumented

with instrumented(__name__):
    import _common
    from google.protobuf.message import DecodeError

    from healthcode._proto.v1 import healthcode_pb2 as pb
    from healthcode.rules import engine
    from healthcode.rules.columns import BatchColumns, Bits
    from healthcode.rules.results import Reason
    from healthcode.wire import rows as wire

TARGET = "rowform"
#: Requests up to this many persons are also evaluated by the reference path, which must agree.
REFERENCE_ROWS = 64
_EPOCH = dt.date(1970, 1, 1)

Row = tuple[object, ...]


def _bit(bits: Bits, i: int) -> bool:
    if bits.data is None:
        return True
    j = bits.offset + i
    return bool(int(bits.data[j >> 3]) >> (j & 7) & 1)


def decoded_rows(cols: BatchColumns) -> list[Row]:
    """The kernel's decode as plain rows: (pid, home, registered, color, sample, report, entries, visits)."""
    assert cols.person_ids is not None
    rows = []
    for i in range(cols.n):
        sample, sample_ok, _ = cols.nat["sample"]
        report, report_ok, _ = cols.nat["report"]
        e0, e1 = int(cols.entries_offsets[i]), int(cols.entries_offsets[i + 1])
        v0, v1 = int(cols.visits_offsets[i]), int(cols.visits_offsets[i + 1])
        color = int(cols.base_color[i]) if _bit(cols.base_color_valid, i) else None
        rows.append(
            (
                int(cols.person_ids[i]) if _bit(cols.person_id_valid, i) else None,
                int(cols.home_region[i]) if _bit(cols.home_region_valid, i) else None,
                _bit(cols.registered, i),
                color if color is None or 0 <= color <= 2 else "invalid",
                int(sample[i]) if _bit(sample_ok, i) else None,
                int(report[i]) if _bit(report_ok, i) else None,
                [int(t) for t in cols.entry_values[e0:e1]],
                [
                    (
                        int(cols.visit_region[v]) if _bit(cols.visit_region_valid, v) else None,
                        int(cols.visit_day[v]) if _bit(cols.visit_day_valid, v) else None,
                    )
                    for v in range(v0, v1)
                ],
            )
        )
    return rows


def _day(visit: pb.Visit) -> int | None:
    if visit.HasField("day"):
        d = visit.day
        try:
            return (dt.date(d.year, d.month, d.day) - _EPOCH).days
        except ValueError:
            return None
    text = visit.day_iso
    if len(text) != 10 or not text.isascii() or text[4] != "-" or text[7] != "-":
        return None
    if not (text[:4] + text[5:7] + text[8:]).isdigit():
        return None
    try:
        return (dt.date(int(text[:4]), int(text[5:7]), int(text[8:])) - _EPOCH).days
    except ValueError:
        return None


def expected_rows(msg: pb.EvaluateRequest) -> list[Row]:
    """The same rows read by Google's protobuf runtime (the contract of the kernel's codec)."""
    rows = []
    for p in msg.persons:
        color = p.base_color if p.HasField("base_color") else None
        rows.append(
            (
                p.person_id if p.HasField("person_id") else None,
                p.home_region if p.HasField("home_region") else None,
                p.registered_commuter,
                color if color is None or 0 <= color <= 2 else "invalid",
                p.nat_sample_time.seconds if p.HasField("nat_sample_time") else None,
                p.nat_report_time.seconds if p.HasField("nat_report_time") else None,
                [t.seconds for t in p.entry_times],
                [(v.region if v.HasField("region") else None, _day(v)) for v in p.visits],
            )
        )
    return rows


_SMALL = wire.SmallRequests()


def _outcome(fn) -> object:  # type: ignore[no-untyped-def]
    """What ``fn`` returns, or the accepted error it raises (anything else propagates)."""
    try:
        return fn()
    except _common.ACCEPTED as exc:
        return exc


def _small_path(data: bytes) -> object:
    """The one-pass path's answer (None: the request does not fit it), or its accepted error."""
    return _outcome(lambda: _SMALL.respond(data, _common.service()._small_rules))


def check(data: bytes) -> None:
    try:
        msg: pb.EvaluateRequest | None = pb.EvaluateRequest.FromString(data)
    except DecodeError:
        msg = None
    try:
        cols, as_of, policy = wire.decode_request(data)
    except wire.WireError as exc:
        _common.clear(exc)
        return  # (a message protobuf reads may still be refused: the codec rejects deprecated groups)
    if msg is not None:
        assert as_of == (msg.as_of.seconds if msg.HasField("as_of") else None), "as_of differs from protobuf's"
        assert policy == msg.policy, "policy differs from protobuf's"
        got, want = decoded_rows(cols), expected_rows(msg)
        assert len(got) == len(want), f"{len(got)} persons decoded, protobuf reads {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g == w, f"person {i} decoded as {g}, protobuf reads {w}"
    out = _common.expect(lambda: _common.service()._evaluate_rows(data))
    small = _small_path(data)
    if small is not None:
        if out is None or isinstance(small, Exception):
            general = _outcome(lambda: _common.service()._evaluate_rows(data))
            assert repr(small) == repr(general), f"small path: {small!r}, general path: {general!r}"
        else:
            assert small == out, "the small-request path and the general path answer differently"
    if out is None:
        return
    response, n = out  # type: ignore[misc]
    assert n == cols.n
    reply = pb.EvaluateResponse.FromString(response)
    assert len(reply.statuses) == n, f"{len(reply.statuses)} statuses for {n} persons"
    for s in reply.statuses:
        invalid = s.reasons_mask == Reason.INVALID_INPUT
        assert invalid == bool(s.error), f"INVALID_INPUT and error disagree: {s}"
        if invalid:
            assert not (s.commuter_badge or s.entry_permitted or s.enrolled), s
    assert reply.invalid_rows == sum(1 for s in reply.statuses if s.error)
    if 0 < n <= REFERENCE_ROWS:
        os.environ[engine.REFERENCE_ENV] = "1"  # the server's reference path (plain Python per row)
        try:
            reference, _ = _common.service()._evaluate_rows(data)
        finally:
            del os.environ[engine.REFERENCE_ENV]
        assert pb.EvaluateResponse.FromString(reference) == reply, "kernel and reference differ"


if __name__ == "__main__":
    # The codec is compiled (no coverage from it): coverage of what protobuf read, and of the comparison, guides
    # the fuzzer towards new message shapes instead.
    import atheris  # type: ignore[import-not-found]

    decoded_rows, expected_rows, _day = (atheris.instrument_func(f) for f in (decoded_rows, expected_rows, _day))
    _common.run_fuzzer(atheris.instrument_func(check))
