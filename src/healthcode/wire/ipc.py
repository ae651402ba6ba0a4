"""Arrow IPC bytes to and from record batches: the bulk path's one reader (with its checks of framing, names,
types and columns) and its writers (whole streams, chunks under a message limit, change-log pages).

No kernel import: the client and ``healthcode call`` use this module without the C build.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pyarrow as pa

from healthcode.errors import HealthcodeError, SchemaError
from healthcode.rules.columns import check_schema
from healthcode.wire.limits import check_rows


class WireError(HealthcodeError):
    """A request's bytes or fields cannot be read; the message says what and where."""


def read_stream(
    data: bytes | memoryview, what: str, *, limit_rows: bool = True, validate: bool = True
) -> tuple[pa.Schema, list[pa.RecordBatch]]:
    """All batches of a complete Arrow IPC stream, zero-copy; unreadable bytes raise :class:`WireError` naming
    ``what``.  The one reader of IPC bytes from the wire (bulk requests, results, ingest).  More rows than the
    rows-per-request limit raise :class:`~healthcode.wire.limits.LimitExceeded` (RESOURCE_EXHAUSTED) as soon as the
    batches read so far pass it (``limit_rows=False``: results, which the server itself wrote).

    The IPC reader checks the framing only: buffers too short for their array, or list offsets out of range, pass
    it.  ``validate`` (the default) checks every column in full, so nothing downstream reads past a buffer; an
    invalid column raises :class:`WireError` naming it.  ``validate=False`` is for callers that validate the columns
    they read themselves (the evaluation path: :func:`healthcode.rules.columns.validate`)."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        batches = []
        rows = 0
        for batch in reader:
            batches.append(batch)
            rows += batch.num_rows
            if limit_rows:
                check_rows(rows, what)
        schema = reader.schema
    except HealthcodeError:  # the rows limit (a ValueError too): RESOURCE_EXHAUSTED, not unreadable bytes
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        detail = str(exc).strip() or type(exc).__name__
        raise WireError(f"{what}: not a readable Arrow IPC stream: {detail}") from None
    _check_names(schema, what)
    if validate:
        _check_types(schema, what)
        for batch in batches:
            _validate_batch(batch, what)
    return schema, batches


def _check_names(schema: pa.Schema, what: str) -> None:
    """Every column and nested field name, and every timestamp time zone, must be UTF-8: pyarrow decodes them on
    use (``schema.names``, ``type.tz``), and an undecodable one would raise UnicodeDecodeError there."""
    for i, column in enumerate(schema):
        try:
            name = column.name
        except UnicodeDecodeError:
            raise WireError(f"{what}: the name of column {i} (from 0) is not UTF-8 text") from None
        fields = [column]
        try:
            while fields:
                t = fields.pop().type
                while isinstance(t, (pa.DictionaryType, pa.BaseExtensionType)):
                    t = t.value_type if isinstance(t, pa.DictionaryType) else t.storage_type
                if isinstance(t, pa.TimestampType):
                    t.tz  # noqa: B018 - decodes it
                for k in range(t.num_fields):
                    fields.append(t.field(k))
                    fields[-1].name  # noqa: B018 - decodes it
        except UnicodeDecodeError:
            raise WireError(f"{what}: column {name!r} has a field name or time zone that is not UTF-8 text") from None


def _check_types(schema: pa.Schema, what: str) -> None:
    """pyarrow cannot build arrays of a few types (month_interval, unions): touching such a column raises KeyError
    or ArrowNotImplementedError (``combine_chunks`` of a stream without batches builds an empty one).  Refuse them
    up front, naming the column.  (Not ``pa.nulls``: it crashes the process on a union without members.)"""
    for field in schema:
        try:
            pa.array([], field.type)
        except (KeyError, NotImplementedError, TypeError, ValueError, pa.ArrowException):
            t = field.type
            raise WireError(f"{what}: column {field.name!r} has type {t}, which this server cannot read") from None


def _validate_batch(batch: pa.RecordBatch, what: str) -> None:
    for i, name in enumerate(batch.schema.names):
        column = batch.column(i)
        try:
            column.validate(full=True)
        except pa.ArrowException as exc:
            raise WireError(f"{what}: column {name!r} is not valid Arrow data: {exc}") from None
    try:
        batch.validate(full=True)
    except pa.ArrowException as exc:
        raise WireError(f"{what}: not a valid Arrow record batch: {exc}") from None


def read_ipc(data: bytes | memoryview, what: str = "arrow_ipc") -> tuple[pa.Schema, list[pa.RecordBatch]]:
    """A population IPC stream; a schema problem names the column.  The columns are validated by the evaluation
    (:func:`healthcode.rules.engine.evaluate_batches`), which reads them, so not here too."""
    schema, batches = read_stream(data, what, validate=False)
    try:
        check_schema(schema)
    except SchemaError as exc:
        raise WireError(f"{what}: {exc}") from None
    return schema, batches


def read_ipc_results(data: bytes) -> list[pa.RecordBatch]:
    """Result batches from a response's Arrow IPC stream."""
    return read_stream(data, "response arrow_ipc", limit_rows=False)[1]


def write_ipc(batches: Sequence[pa.RecordBatch], schema: pa.Schema) -> bytes:
    """Batches as one complete Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for b in batches:
            writer.write_batch(b)
    return sink.getvalue().to_pybytes()


def ipc_chunks(batch: pa.RecordBatch | pa.Table, limit: int) -> Iterator[tuple[bytes, int]]:
    """``batch`` as IPC streams of at most about ``limit`` bytes each, with their row counts."""
    rows = batch.num_rows
    if rows == 0:
        yield write_ipc(batch.to_batches() if isinstance(batch, pa.Table) else [batch], batch.schema), 0
        return
    per_row = max(1.0, batch.nbytes / rows)
    step = max(1, int(limit * 0.8 / per_row))
    start = 0
    while start < rows:
        piece = batch.slice(start, step)
        parts = piece.to_batches() if isinstance(piece, pa.Table) else [piece]
        data = write_ipc(parts, batch.schema)
        if len(data) > limit and step > 1:
            step = max(1, step // 2)  # denser rows than estimated: retry this slice smaller
            continue
        yield data, piece.num_rows
        start += piece.num_rows


def _read_varint(data: memoryview, at: int) -> tuple[int, int] | None:
    value = shift = 0
    while at < len(data) and shift < 64:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
    return None


def split_arrow_request(data: bytes) -> tuple[bytes | None, memoryview] | None:
    """An EvaluateArrowRequest's bytes as (its options' bytes, None when absent; its arrow_ipc as a view of
    ``data``, no copy of the 3-4 MB a message carries), for the plain shape clients send: only fields 1 and 2, each
    length-delimited (repeats merged as protobuf merges them: options concatenated, the last arrow_ipc kept).  None
    for anything else (unknown fields, other wire types, malformed bytes): protobuf then reads the message."""
    view = memoryview(data)
    at, options, arrow = 0, [], view[0:0]
    while at < len(view):
        tag = _read_varint(view, at)
        if tag is None or tag[0] not in (0x0A, 0x12):
            return None
        size = _read_varint(view, tag[1])
        if size is None or size[1] + size[0] > len(view):
            return None
        field = view[size[1] : size[1] + size[0]]
        if tag[0] == 0x0A:
            options.append(field)
        else:
            arrow = field
        at = size[1] + size[0]
    return (b"".join(options) if options else None), arrow


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def arrow_response(data: bytes, rows: int) -> bytes:
    """The serialized ``EvaluateArrowResponse(arrow_ipc=data, rows=rows)``, the bytes protobuf writes (fields 2 and
    3 in order), with one copy of ``data`` (a message object would copy it in and again out)."""
    parts: list[bytes] = []
    if data:  # (protobuf leaves out empty and zero fields)
        parts += (b"\x12", _varint(len(data)), data)
    if rows:
        parts += (b"\x18", _varint(rows))
    return b"".join(parts)


def changes_ipc(page: pa.Table) -> bytes:
    """Change-log rows (:meth:`healthcode.store.Store.changes`) as one Arrow IPC stream (WatchChangesArrow),
    ``as_of`` as a UTC timestamp."""
    i = page.schema.get_field_index("as_of")
    page = page.set_column(i, "as_of", page.column(i).cast(pa.timestamp("s", tz="UTC")))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, page.schema) as writer:
        writer.write_table(page)
    return sink.getvalue().to_pybytes()
