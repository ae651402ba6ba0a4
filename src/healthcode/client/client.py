"""A small typed client for the healthcode service.

``evaluate`` sends persons in row form (the gateway path); ``evaluate_arrow`` streams a ``pyarrow.Table`` through
the bulk path in chunks under the message limit and reassembles the result table in order.

Against a secured server: ``Client(target, tls_ca="ca.crt", tls_cert="client.crt", tls_key="client.key",
token=read_token("gateway.token"))`` (TLS with a client certificate for mutual TLS, and a bearer token).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import pyarrow as pa

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc
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


class Client:
    """``Client("127.0.0.1:50051")``; use as a context manager or call :meth:`close`.

    For a secured server give ``tls_ca`` (and ``tls_cert``/``tls_key`` under mutual TLS) and ``token`` (a bearer
    token, e.g. from :func:`read_token`); see :func:`make_channel`."""

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

    def evaluate(
        self, persons: Sequence[pb.Person], as_of: Instant | None = None, policy: str = ""
    ) -> pb.EvaluateResponse:
        """Evaluate persons in row form; one Status per person, in order."""
        request = pb.EvaluateRequest(persons=persons, policy=policy)
        if as_of is not None:
            request.as_of.CopyFrom(_timestamp(as_of))
        return self.stub.Evaluate(request, timeout=self.timeout)

    def evaluate_arrow(
        self,
        table: pa.Table,
        as_of: Instant | None = None,
        policy: str = "",
        on_rows: Callable[[int], None] | None = None,
    ) -> tuple[pa.Table, pb.EvaluationInfo]:
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
        return pa.Table.from_batches(batches, schema=RESULT_SCHEMA), info

    def put_risk_list(
        self, source: str | os.PathLike[str] | Iterable[Sequence[Any] | Mapping[str, Any]]
    ) -> pb.PutRiskListResponse:
        """Replace the risk list from a CSV path or from rows ``(region, start_date, end_date, kind)``."""
        if isinstance(source, (str, os.PathLike)):
            with open(source, encoding="utf-8") as f:
                return self.stub.PutRiskList(pb.PutRiskListRequest(csv=f.read()), timeout=self.timeout)
        entries = []
        for row in source:
            fields = [row.get(k) for k in RISK_CSV_HEADER] if isinstance(row, Mapping) else list(row)
            region, start, end, kind = (list(fields) + [None] * 4)[:4]
            entries.append(
                pb.RiskEntry(region=int(region or 0), start_date=start or "", end_date=end or "", kind=kind or "")
            )
        request = pb.PutRiskListRequest(entries=pb.RiskEntries(entries=entries))
        return self.stub.PutRiskList(request, timeout=self.timeout)

    def get_risk_list(self) -> pb.GetRiskListResponse:
        return self.stub.GetRiskList(pb.GetRiskListRequest(), timeout=self.timeout)

    def put_policy(self, toml_text: str) -> pb.PutPolicyResponse:
        return self.stub.PutPolicy(pb.PutPolicyRequest(toml=toml_text), timeout=self.timeout)

    def get_policy(self) -> pb.GetPolicyResponse:
        return self.stub.GetPolicy(pb.GetPolicyRequest(), timeout=self.timeout)
