"""The result schema of SPEC §4 and its assembly from the evaluation's buffers; the reason bits (:class:`Reason`)
and the per-row error messages, whose numbers :mod:`healthcode.rules.codes` defines."""

from __future__ import annotations

import enum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthcode.rules import codes


class Reason(enum.IntFlag):
    """SPEC §4.6: every condition is reported independently of the outcome (the bits of :mod:`codes`)."""

    POLICY_INACTIVE = codes.POLICY_INACTIVE
    CODE_NOT_GREEN = codes.CODE_NOT_GREEN
    NAT_MISSING = codes.NAT_MISSING
    NAT_EXPIRED = codes.NAT_EXPIRED
    ENTRY_NAT_MISSING = codes.ENTRY_NAT_MISSING
    RISK_TRAVEL = codes.RISK_TRAVEL
    NOT_ENROLLED = codes.NOT_ENROLLED
    PATTERN_NOT_MET = codes.PATTERN_NOT_MET
    HOME_OUTSIDE_RING = codes.HOME_OUTSIDE_RING
    INVALID_INPUT = codes.INVALID_INPUT


RESULT_SCHEMA = pa.schema(
    [
        pa.field("person_id", pa.uint64()),
        pa.field("commuter_badge", pa.bool_(), nullable=False),
        pa.field("entry_permitted", pa.bool_(), nullable=False),
        pa.field("enrolled", pa.bool_(), nullable=False),
        pa.field("reasons", pa.uint16(), nullable=False),
        pa.field("badge_valid_until", pa.timestamp("s", tz="UTC")),
        pa.field("entry_valid_until", pa.timestamp("s", tz="UTC")),
        pa.field("error", pa.string()),
    ]
)

#: Per-row validation failures (SPEC §4.1), by the code the kernel writes (defined in :mod:`codes`).
ERROR_MESSAGES = codes.ERROR_MESSAGES


def _message_parts() -> tuple[list[bytes], list[bytes | None]]:
    """Each error message split at its ``{i}``: (the text before it, the text after it or None when it has none),
    by code, as UTF-8."""
    size = max(ERROR_MESSAGES) + 1
    heads: list[bytes] = [b""] * size
    tails: list[bytes | None] = [None] * size
    for code, text in ERROR_MESSAGES.items():
        head, indexed, tail = text.partition("{i}")
        heads[code], tails[code] = head.encode(), (tail.encode() if indexed else None)
    return heads, tails


#: The messages by code, split at their ``{i}`` (see :func:`error_column`; the kernel's ``error_texts`` takes them).
MESSAGE_HEADS, MESSAGE_TAILS = _message_parts()


def error_column(
    n: int,
    rows: np.ndarray,
    err_code: np.ndarray,
    err_index: np.ndarray,
    texts: tuple[np.ndarray, bytes] | None = None,
) -> pa.Array:
    """The ``error`` column of ``n`` rows: the message of ``err_code[k]`` at row ``rows[k]``, null elsewhere.

    ``texts``: the messages already written (their lengths and UTF-8 text, as the kernel's ``error_texts`` writes
    them from :data:`MESSAGE_HEADS` and :data:`MESSAGE_TAILS`); without them they are built with Arrow compute.
    Since ``rows`` ascend, the text is in row order, and only the offsets and the validity bitmap are spread to all
    ``n`` rows.
    """
    if len(rows) == 0:
        return pa.nulls(n, pa.string())
    if texts is not None:
        lengths, text = texts
        msg_data = pa.py_buffer(text)
    else:
        heads = [h.decode() for h in MESSAGE_HEADS]
        tails = ["" if t is None else t.decode() for t in MESSAGE_TAILS]
        indexed = [t is not None for t in MESSAGE_TAILS]
        codes = pa.array(err_code.astype(np.int32))
        index_text = pc.if_else(
            pa.array(indexed).take(codes), pc.cast(pa.array(err_index.astype(np.int64)), pa.string()), ""
        )
        messages = pc.binary_join_element_wise(
            pa.array(heads).take(codes), index_text, pa.array(tails).take(codes), ""
        )
        _, msg_offsets, msg_data = messages.buffers()
        msg_starts = np.frombuffer(msg_offsets, dtype=np.int32, count=len(rows) + 1, offset=messages.offset * 4)
        lengths = np.diff(msg_starts)
        msg_data = msg_data.slice(int(msg_starts[0]))
    offsets = np.zeros(n + 1, dtype=np.int32)
    offsets[rows + 1] = lengths
    np.cumsum(offsets, out=offsets)
    valid = np.zeros(n, dtype=bool)
    valid[rows] = True
    validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(
        pa.string(), n, [validity, pa.py_buffer(offsets), msg_data], null_count=n - len(rows)
    )


def assemble_packed(
    person_id: pa.Array, bits: np.ndarray, reasons: np.ndarray, until: np.ndarray, errors: pa.Array
) -> pa.RecordBatch:
    """A result batch from the kernel's buffers, zero-copy: ``bits`` rows are the badge, entry and enrolled
    bitmaps (the first two are also the validity of ``until``'s two rows, badge and entry valid-until)."""
    n = len(reasons)
    badge, entry, enrolled = (pa.py_buffer(bits[k]) for k in range(3))
    instant = pa.timestamp("s", tz="UTC")
    return pa.RecordBatch.from_arrays(
        [
            person_id,
            pa.Array.from_buffers(pa.bool_(), n, [None, badge]),
            pa.Array.from_buffers(pa.bool_(), n, [None, entry]),
            pa.Array.from_buffers(pa.bool_(), n, [None, enrolled]),
            pa.Array.from_buffers(pa.uint16(), n, [None, pa.py_buffer(reasons)]),
            pa.Array.from_buffers(instant, n, [badge, pa.py_buffer(until[0])]),
            pa.Array.from_buffers(instant, n, [entry, pa.py_buffer(until[1])]),
            errors,
        ],
        schema=RESULT_SCHEMA,
    )


def _bools(values: np.ndarray) -> pa.Array:
    return pa.array(values.view(np.bool_) if values.dtype == np.uint8 else values, type=pa.bool_())


def _instants(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    return pa.array(values, type=pa.timestamp("s", tz="UTC"), mask=~valid.view(np.bool_))


def assemble(
    person_id: pa.Array,
    commuter_badge: np.ndarray,
    entry_permitted: np.ndarray,
    enrolled: np.ndarray,
    reasons: np.ndarray,
    badge_valid_until: np.ndarray,
    badge_until_valid: np.ndarray,
    entry_valid_until: np.ndarray,
    entry_until_valid: np.ndarray,
    err_code: np.ndarray,
    err_index: np.ndarray,
) -> pa.RecordBatch:
    """One result batch in RESULT_SCHEMA from per-row arrays (bools as uint8 or bool; the reference path)."""
    bad = np.flatnonzero(err_code)
    return pa.RecordBatch.from_arrays(
        [
            person_id,
            _bools(commuter_badge),
            _bools(entry_permitted),
            _bools(enrolled),
            pa.array(reasons.astype(np.uint16, copy=False), type=pa.uint16()),
            _instants(badge_valid_until, badge_until_valid),
            _instants(entry_valid_until, entry_until_valid),
            error_column(len(err_code), bad, err_code[bad], err_index[bad]),
        ],
        schema=RESULT_SCHEMA,
    )
