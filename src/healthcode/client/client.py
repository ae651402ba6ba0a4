"""The typed Python client of the healthcode service: one method per RPC, plain values back
(:mod:`healthcode.client.values`).

``evaluate`` sends persons in row form (the gateway path); ``evaluate_arrow`` streams a ``pyarrow.Table`` through
the bulk path in chunks under the message limit and reassembles the result table in order; ``watch_changes``
follows the change log and reconnects by itself; the ingest methods take rows or a ``pyarrow.Table``.

Against a secured server: ``Client(target, tls_ca="ca.crt", tls_cert="client.crt", tls_key="client.key",
token=read_token("gateway.token"))`` (TLS with a client certificate for mutual TLS, and a bearer token).
"""

from __future__ import annotations

import collections
import datetime as _dt
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import grpc
import pyarrow as pa

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc
from healthcode.client.values import (
    Change,
    ChangeBatch,
    Evaluation,
    Info,
    IngestCounts,
    Lookup,
    PolicyChange,
    PolicyVersion,
    Reevaluation,
    RiskListChange,
    RiskListVersion,
)
from healthcode.rules.columns import check_schema
from healthcode.rules.regions import RISK_CSV_HEADER
from healthcode.rules.results import RESULT_SCHEMA
from healthcode.rules.timebase import to_instant
from healthcode.wire.ipc import ipc_chunks, read_ipc_results

DEFAULT_MESSAGE_BYTES = 4 * 1024 * 1024
Instant = _dt.datetime | int | float | str
#: Environment variable a bearer token is read from when no token file is given (see :func:`read_token`).
TOKEN_ENV = "HEALTHCODE_TOKEN"


def read_token(path: str | os.PathLike[str] | None = None, env: str = TOKEN_ENV) -> str | None:
    """A bearer token from a file (its first line) or else from the environment variable ``env``; None if
    neither is given.  An unreadable or empty file raises ``ValueError`` naming the file (never the token)."""
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the token file: {getattr(exc, 'strerror', None) or exc}") from None
        if not token:
            raise ValueError(f"{path}: the token file is empty")
        return token
    return os.environ.get(env) or None


def channel_credentials(
    tls_ca: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials: ``tls_ca`` the CA bundle that signed the server's certificate (None: the system roots);
    ``tls_cert`` and ``tls_key`` this client's certificate and key, for mutual TLS."""

    def read(p: str | os.PathLike[str] | None) -> bytes | None:
        if p is None:
            return None
        with open(p, "rb") as f:
            return f.read()

    if bool(tls_cert) != bool(tls_key):
        raise ValueError("give both tls_cert and tls_key (the client certificate and its private key)")
    return grpc.ssl_channel_credentials(
        root_certificates=read(tls_ca), private_key=read(tls_key), certificate_chain=read(tls_cert)
    )


class _Metadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the authorization header) to every call of a channel."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = list(metadata)

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), *self.metadata])

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)


def make_channel(
    target: str,
    *,
    max_message_bytes: int = DEFAULT_MESSAGE_BYTES,
    tls_ca: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    tls: bool | None = None,
    server_name: str | None = None,
    token: str | None = None,
) -> grpc.Channel:
    """A channel to a healthcode server: TLS when ``tls`` (default: when any of tls_ca/tls_cert/tls_key is
    given), and every call carrying ``authorization: Bearer <token>`` when ``token`` is given.
    ``server_name`` overrides the name checked against the server's certificate."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if tls is None:
        tls = any(x is not None for x in (tls_ca, tls_cert, tls_key))
    if tls:
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.secure_channel(target, channel_credentials(tls_ca, tls_cert, tls_key), options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    if token:
        channel = grpc.intercept_channel(channel, _Metadata([("authorization", f"Bearer {token}")]))
    return channel


def _timestamp(value: Instant) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    return Timestamp(seconds=to_instant(value))


_TIMESTAMP = pa.timestamp("s", tz="UTC")
#: The columns of each ingest kind's rows (what the store takes; see healthcode.wire.ingest).
INGEST_COLUMNS: dict[str, dict[str, pa.DataType]] = {
    "persons": {
        "person_id": pa.uint64(), "home_region": pa.int32(), "registered_commuter": pa.bool_(),
        "base_color": pa.int32(),
    },
    "nat_results": {"person_id": pa.uint64(), "sample_time": _TIMESTAMP, "report_time": _TIMESTAMP},
    "entries": {"person_id": pa.uint64(), "t": _TIMESTAMP},
    "visits": {"person_id": pa.uint64(), "region": pa.int32(), "day": pa.date32()},
}  # fmt: skip
_INGEST_RPCS = {
    "persons": ("UpsertPersons", pb.UpsertPersonsRequest),
    "nat_results": ("RecordNatResults", pb.RecordNatResultsRequest),
    "entries": ("RecordEntries", pb.RecordEntriesRequest),
    "visits": ("RecordVisits", pb.RecordVisitsRequest),
}
#: Stream errors after which a change stream reconnects (the server restarted, is shutting down or shedding).
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED})

T = TypeVar("T")


def _day(value: Any, row: int, column: str) -> _dt.date | None:
    if value is None or (isinstance(value, _dt.date) and not isinstance(value, _dt.datetime)):
        return value
    if isinstance(value, str):
        try:
            return _dt.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ValueError(f"row {row}, column {column!r}: {value!r} is not a date (YYYY-MM-DD)")


def _seconds(value: Any, row: int, column: str) -> int | None:
    if value is None:
        return None
    try:
        return to_instant(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"row {row}, column {column!r}: {exc}") from None


def ingest_table(kind: str, rows: pa.Table | Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows of an ingest ``kind`` (mappings with the columns of :data:`INGEST_COLUMNS`; instants as aware datetimes,
    ISO-8601 strings with an offset or epoch seconds; days as dates or ``YYYY-MM-DD``) as the Arrow table the
    server takes.  A table is passed through as it is (the server checks it)."""
    if kind not in INGEST_COLUMNS:
        raise ValueError(f"unknown ingest kind {kind!r}; the kinds are {', '.join(INGEST_COLUMNS)}")
    if isinstance(rows, pa.Table):
        return rows
    types = INGEST_COLUMNS[kind]
    cols: dict[str, list[Any]] = {name: [] for name in types}
    for i, row in enumerate(rows):
        unknown = set(row) - set(types)
        if unknown:
            raise ValueError(f"row {i}: unknown column {sorted(unknown)[0]!r}; {kind} rows have {', '.join(types)}")
        for name, type_ in types.items():
            value = row.get(name)
            if type_ == _TIMESTAMP:
                value = _seconds(value, i, name)
            elif type_ == pa.date32():
                value = _day(value, i, name)
            cols[name].append(value)
    try:
        return pa.table({name: pa.array(values, type=types[name]) for name, values in cols.items()})
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        raise ValueError(f"{kind} rows: {exc}") from None


def person_message(row: Mapping[str, Any], index: int = 0) -> pb.Person:
    """One person in the SPEC §3 population form (a mapping: person_id, home_region, registered_commuter,
    base_color, nat_sample_time, nat_report_time, entry_times, visits [{region, day}]) as a row-form Person.
    Absent keys are nulls; instants as for :func:`ingest_table`."""
    p = pb.Person(registered_commuter=bool(row.get("registered_commuter")))
    for name in ("person_id", "home_region", "base_color"):
        if row.get(name) is not None:
            setattr(p, name, int(row[name]))
    for name in ("nat_sample_time", "nat_report_time"):
        seconds = _seconds(row.get(name), index, name)
        if seconds is not None:
            getattr(p, name).seconds = seconds
    for t in row.get("entry_times") or ():
        seconds = _seconds(t, index, "entry_times")
        if seconds is not None:  # a null entry time has no row form: dropped
            p.entry_times.add(seconds=seconds)
    for v in row.get("visits") or ():
        visit = p.visits.add()
        if v is None:
            continue  # an empty Visit: the server marks the row invalid
        if v.get("region") is not None:
            visit.region = int(v["region"])
        d = _day(v.get("day"), index, "visits.day")
        if d is not None:
            visit.day.year, visit.day.month, visit.day.day = d.year, d.month, d.day
    return p


class ChangeStream(Generic[T]):
    """An iterator over a change stream that, with ``resume``, reconnects after a dropped connection or a server
    restart and goes on from the last sequence number it delivered: nothing missed, nothing twice.

    ``last_sequence`` is the sequence number of the last change delivered (give it as ``from_sequence`` to resume
    in another process); :meth:`close` (or leaving a ``with`` block) ends it from any thread."""

    def __init__(
        self,
        open_call: Callable[[int], Any],
        items: Callable[[Any], Iterable[T]],
        last_of: Callable[[T], int],
        from_sequence: int,
        resume: bool,
        max_backoff: float = 10.0,
        on_reconnect: Callable[[grpc.RpcError, int, float], None] | None = None,
    ) -> None:
        self._open = open_call
        self._items = items
        self._last_of = last_of
        self.last_sequence = from_sequence
        self.resume = resume
        self.reconnects = 0
        self._max_backoff = max_backoff
        self._on_reconnect = on_reconnect
        self._buffer: collections.deque[T] = collections.deque()
        self._call: Any = None
        self._closed = threading.Event()

    def __iter__(self) -> ChangeStream[T]:
        return self

    def __enter__(self) -> ChangeStream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        if self._call is not None:
            self._call.cancel()

    def __next__(self) -> T:
        backoff = 0.2
        while not self._buffer:
            if self._closed.is_set():
                raise StopIteration
            if self._call is None:
                self._call = self._open(self.last_sequence)
            try:
                message = next(self._call)
            except StopIteration:  # the server ended the stream cleanly (it never does while serving)
                self._call = None
                if not self.resume:
                    raise
                continue
            except grpc.RpcError as exc:
                self._call = None
                if self._closed.is_set():
                    raise StopIteration from None
                if not self.resume or exc.code() not in RESUMABLE:
                    raise
                self.reconnects += 1
                if self._on_reconnect is not None:
                    self._on_reconnect(exc, self.last_sequence, backoff)
                if self._closed.wait(backoff):
                    raise StopIteration from None
                backoff = min(backoff * 2, self._max_backoff)
                continue
            self._buffer.extend(self._items(message))
        item = self._buffer.popleft()
        self.last_sequence = self._last_of(item)
        return item


class Client:
    """``Client("127.0.0.1:50051")``; use as a context manager or call :meth:`close`.  One method per RPC; calls
    raise ``grpc.RpcError`` (``code()``, ``details()``) when the server refuses them.

    For a secured server give ``tls_ca`` (and ``tls_cert``/``tls_key`` under mutual TLS) and ``token`` (a bearer
    token, e.g. from :func:`read_token`); see :func:`make_channel`.  ``timeout`` bounds each unary call (seconds;
    the change streams have none)."""

    def __init__(
        self,
        target: str,
        *,
        max_message_bytes: int = DEFAULT_MESSAGE_BYTES,
        timeout: float | None = 60.0,
        channel: grpc.Channel | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls: bool | None = None,
        server_name: str | None = None,
        token: str | None = None,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.timeout = timeout
        self.channel = channel or make_channel(
            target,
            max_message_bytes=max_message_bytes,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls=tls,
            server_name=server_name,
            token=token,
        )
        self.stub = pb_grpc.HealthCodeServiceStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    # -- evaluation ---------------------------------------------------------------------------------------------

    def evaluate(
        self,
        persons: pa.Table | Iterable[Mapping[str, Any] | pb.Person],
        as_of: Instant | None = None,
        policy: str = "",
    ) -> Evaluation:
        """Evaluate a few persons through the gateway path (row form); one Status per person, in order.

        ``persons``: a table in the SPEC §3 population schema, or mappings with its columns."""
        rows = persons.to_pylist() if isinstance(persons, pa.Table) else persons
        messages = [p if isinstance(p, pb.Person) else person_message(p, i) for i, p in enumerate(rows)]
        request = pb.EvaluateRequest(persons=messages, policy=policy)
        if as_of is not None:
            request.as_of.CopyFrom(_timestamp(as_of))
        return Evaluation.of(self.stub.Evaluate(request, timeout=self.timeout))

    def evaluate_arrow(
        self,
        table: pa.Table,
        as_of: Instant | None = None,
        policy: str = "",
        on_rows: Callable[[int], None] | None = None,
    ) -> tuple[pa.Table, Info]:
        """Stream ``table`` (SPEC §3 schema) through the bulk path; returns the result table and what was used.

        ``on_rows(n)`` is called as result rows arrive (progress bars)."""
        check_schema(table.schema)
        options = pb.EvaluateOptions(policy=policy)
        if as_of is not None:
            options.as_of.CopyFrom(_timestamp(as_of))
        limit = self.max_message_bytes - 4096

        def requests() -> Iterator[pb.EvaluateArrowRequest]:
            yield pb.EvaluateArrowRequest(options=options)
            for data, _rows in ipc_chunks(table, limit):
                yield pb.EvaluateArrowRequest(arrow_ipc=data)

        info = pb.EvaluationInfo()
        batches: list[pa.RecordBatch] = []
        for response in self.stub.EvaluateArrow(requests(), timeout=self.timeout):
            if response.HasField("info"):
                info = response.info
            if response.arrow_ipc:
                got = read_ipc_results(response.arrow_ipc)
                batches.extend(got)
                if on_rows is not None:
                    on_rows(sum(b.num_rows for b in got))
        return pa.Table.from_batches(batches, schema=RESULT_SCHEMA), Info.of(info)

    def get_status(self, person_ids: Iterable[int], as_of: Instant | None = None) -> Lookup:
        """The current evaluation of stored persons (the gateway's lookup), in the order asked."""
        request = pb.GetStatusRequest(person_ids=[int(p) for p in person_ids])
        if as_of is not None:
            request.as_of.CopyFrom(_timestamp(as_of))
        return Lookup.of(self.stub.GetStatus(request, timeout=self.timeout))

    # -- the store: re-evaluation, the change log, ingest --------------------------------------------------------

    def reevaluate(self, as_of: Instant | None = None) -> Reevaluation:
        """Re-evaluate every stored person at ``as_of`` (default: the server's clock) and publish the changes."""
        request = pb.ReevaluateRequest()
        if as_of is not None:
            request.as_of.CopyFrom(_timestamp(as_of))
        return Reevaluation.of(self.stub.Reevaluate(request, timeout=self.timeout).reevaluation)

    def watch_changes(
        self,
        from_sequence: int = 0,
        *,
        resume: bool = True,
        on_reconnect: Callable[[grpc.RpcError, int, float], None] | None = None,
    ) -> ChangeStream[Change]:
        """Every published change after ``from_sequence``, then live ones as they are published (the iterator
        does not end by itself: break out of it or :meth:`ChangeStream.close` it).  With ``resume`` it
        reconnects after a lost connection or a server restart and goes on where it stopped;
        ``on_reconnect(error, last_sequence, wait_seconds)`` is called before each new attempt."""

        def open_call(after: int) -> Any:
            return self.stub.WatchChanges(pb.WatchChangesRequest(from_sequence=after))

        def items(message: pb.WatchChangesResponse) -> list[Change]:
            return [Change.of(c) for c in message.changes]

        return ChangeStream(open_call, items, lambda c: c.sequence, from_sequence, resume, on_reconnect=on_reconnect)

    def watch_changes_arrow(
        self,
        from_sequence: int = 0,
        *,
        resume: bool = True,
        on_reconnect: Callable[[grpc.RpcError, int, float], None] | None = None,
    ) -> ChangeStream[ChangeBatch]:
        """The change log in bulk: Arrow tables of up to 100,000 changes each (see :class:`ChangeBatch`), then
        live; reconnects and resumes like :meth:`watch_changes`."""

        def open_call(after: int) -> Any:
            return self.stub.WatchChangesArrow(pb.WatchChangesArrowRequest(from_sequence=after))

        def items(message: pb.WatchChangesArrowResponse) -> list[ChangeBatch]:
            table = pa.ipc.open_stream(message.arrow_ipc).read_all()
            return [ChangeBatch(message.first_sequence, message.last_sequence, table)]

        return ChangeStream(
            open_call, items, lambda b: b.last_sequence, from_sequence, resume, on_reconnect=on_reconnect
        )

    def _ingest(
        self, kind: str, rows: pa.Table | Iterable[Mapping[str, Any]], on_rows: Callable[[int], None] | None
    ) -> IngestCounts:
        """Send a kind's rows as Arrow IPC, in calls under the message limit (each call atomic); counts summed."""
        method, request_type = _INGEST_RPCS[kind]
        call = getattr(self.stub, method)
        total = IngestCounts(0, 0, 0)
        for data, n in ipc_chunks(ingest_table(kind, rows), self.max_message_bytes - 4096):
            total += IngestCounts.of(call(request_type(arrow_ipc=data), timeout=self.timeout))
            if on_rows is not None:
                on_rows(n)
        return total

    def upsert_persons(
        self, rows: pa.Table | Iterable[Mapping[str, Any]], on_rows: Callable[[int], None] | None = None
    ) -> IngestCounts:
        """Add or update stored persons: person_id, home_region, registered_commuter, base_color."""
        return self._ingest("persons", rows, on_rows)

    def record_nat_results(
        self, rows: pa.Table | Iterable[Mapping[str, Any]], on_rows: Callable[[int], None] | None = None
    ) -> IngestCounts:
        """Record NAT results: person_id, sample_time (may be null), report_time."""
        return self._ingest("nat_results", rows, on_rows)

    def record_entries(
        self, rows: pa.Table | Iterable[Mapping[str, Any]], on_rows: Callable[[int], None] | None = None
    ) -> IngestCounts:
        """Record entries into Beijing: person_id, t."""
        return self._ingest("entries", rows, on_rows)

    def record_visits(
        self, rows: pa.Table | Iterable[Mapping[str, Any]], on_rows: Callable[[int], None] | None = None
    ) -> IngestCounts:
        """Record county-days of presence: person_id, region, day."""
        return self._ingest("visits", rows, on_rows)

    # -- the control plane: risk list and policy -----------------------------------------------------------------

    def put_risk_list(
        self, source: str | os.PathLike[str] | Iterable[Sequence[Any] | Mapping[str, Any]]
    ) -> RiskListChange:
        """Replace the risk list from a CSV path or from rows ``(region, start_date, end_date, kind)``."""
        if isinstance(source, (str, os.PathLike)):
            with open(source, encoding="utf-8") as f:
                request = pb.PutRiskListRequest(csv=f.read())
        else:
            entries = []
            for row in source:
                fields = [row.get(k) for k in RISK_CSV_HEADER] if isinstance(row, Mapping) else list(row)
                region, start, end, kind = (list(fields) + [None] * 4)[:4]
                entries.append(
                    pb.RiskEntry(region=int(region or 0), start_date=start or "", end_date=end or "", kind=kind or "")
                )
            request = pb.PutRiskListRequest(entries=pb.RiskEntries(entries=entries))
        return RiskListChange.of(self.stub.PutRiskList(request, timeout=self.timeout))

    def get_risk_list(self) -> RiskListVersion:
        """The risk list in force and its version (``.csv()`` gives it back as CSV)."""
        return RiskListVersion.of(self.stub.GetRiskList(pb.GetRiskListRequest(), timeout=self.timeout))

    def put_policy(self, toml_text: str) -> PolicyChange:
        """Replace the policy timeline (TOML text, validated by the server first)."""
        return PolicyChange.of(self.stub.PutPolicy(pb.PutPolicyRequest(toml=toml_text), timeout=self.timeout))

    def get_policy(self) -> PolicyVersion:
        """The policy timeline in force: version, names, TOML text."""
        return PolicyVersion.of(self.stub.GetPolicy(pb.GetPolicyRequest(), timeout=self.timeout))
