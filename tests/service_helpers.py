"""Helpers for the service tests: run the real ``healthcode serve`` as a subprocess, build row-form Person messages
from the same dicts that ``conftest.make_population`` turns into Arrow tables, and small wire utilities.

Nothing here imports the server module: the server under test is always a separate process.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
from conftest import EPOCH_DATE, seconds
from google.protobuf.timestamp_pb2 import Timestamp

from healthcode import logs
from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode.rules.results import RESULT_SCHEMA

VENV_BIN = Path(sys.executable).parent
HEALTHCODE = str(VENV_BIN / "healthcode")
READY_TIMEOUT = 30.0

_SERVING_RE = re.compile(r"^healthcode serving on (\S+:\d+)\s*$", re.M)
_METRICS_RE = re.compile(r"^metrics on (https?://\S+:\d+/metrics)\s*$", re.M)


def healthcode_cmd() -> list[str]:
    """The ``healthcode`` console script of this virtualenv (falls back to ``python -m healthcode.cli``)."""
    if os.path.exists(HEALTHCODE):
        return [HEALTHCODE]
    return [sys.executable, "-m", "healthcode.cli"]


#: "on": every ServerProcess serves behind the shedding front (healthcode.service.front), as an exposed server does.
FRONT = os.environ.get("HEALTHCODE_TEST_FRONT", "")


#: Servers started and not yet stopped: a test that fails half-way leaves its server here, and the autouse fixture
#: of tests/conftest.py stops it (no orphaned server outlives its test).
RUNNING: set[ServerProcess] = set()


def stop_leftover_servers(keep: set[ServerProcess] | frozenset[ServerProcess] = frozenset()) -> None:
    for server in list(RUNNING - keep):
        server.stop()


class ServerProcess:
    """A ``healthcode serve`` subprocess on free ports; stdout and stderr go to files under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        risk_csv: str | None = None,
        policy_toml: str | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        name: str = "server",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [*healthcode_cmd(), "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
        if risk_csv is not None:
            risk_path = self.workdir / f"{name}-risk.csv"
            risk_path.write_text(risk_csv, encoding="utf-8")
            args += ["--risk", str(risk_path)]
        if policy_toml is not None:
            policy_path = self.workdir / f"{name}-policy.toml"
            policy_path.write_text(policy_toml, encoding="utf-8")
            args += ["--policy", str(policy_path)]
        args += list(extra_args)
        if FRONT and "--front" not in args:  # HEALTHCODE_TEST_FRONT=on: run the service tests behind the front
            args += ["--front", FRONT]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHCODE_")}
        full_env.update(env or {})
        self.stdout_path = self.workdir / f"{name}.stdout"
        self.stderr_path = self.workdir / f"{name}.stderr"
        self._stdout = open(self.stdout_path, "wb")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            args, stdout=self._stdout, stderr=self._stderr, stdin=subprocess.DEVNULL, env=full_env, cwd=self.workdir
        )
        RUNNING.add(self)
        self.address = ""
        self.metrics_url = ""
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            out = self.stdout_path.read_text("utf-8", errors="replace")
            serving, metrics = _SERVING_RE.search(out), _METRICS_RE.search(out)
            if serving and metrics:
                self.address = serving.group(1)
                self.metrics_url = metrics.group(1)
                return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"healthcode serve exited with {self.proc.returncode} before it was ready:\n"
                    f"stdout: {out}\nstderr: {self.stderr()}"
                )
            time.sleep(0.05)
        raise RuntimeError(f"healthcode serve not ready after {READY_TIMEOUT} s; stderr: {self.stderr()}")

    def stdout(self) -> str:
        return self.stdout_path.read_text("utf-8", errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", errors="replace")

    def rpc_log_lines(self) -> list[str]:
        """The per-call log lines written so far, after waiting for the ones still batched (logs.FLUSH_SECONDS)."""
        time.sleep(3 * logs.FLUSH_SECONDS)
        return [line for line in self.stderr().splitlines() if '"event": "rpc"' in line]

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return r.read().decode("utf-8")

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int | None:
        """Terminate (SIGTERM, then SIGKILL after a few seconds); returns the exit code."""
        RUNNING.discard(self)
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=8)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=8)
        finally:
            self._stdout.close()
            self._stderr.close()
        return self.proc.returncode


def changes(responses: Iterable[pb.WatchChangesResponse]) -> Iterator[pb.StatusChange]:
    """The StatusChange messages of a WatchChanges stream, one by one."""
    for response in responses:
        yield from response.changes


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` with these ``labels`` in a Prometheus text page (None: not there)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


def free_port() -> int:
    """A local TCP port with nothing listening on it (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------------------------------------------
# Row form: the same dicts as conftest.make_population, as Person messages


def ts(t: dt.datetime | int) -> Timestamp:
    return Timestamp(seconds=t if isinstance(t, int) else seconds(t))


def person(row: Mapping[str, Any], index: int) -> pb.Person:
    """A Person message from a ``make_population`` row dict (same defaults; a key with None gives an absent field).

    Visits become ``Visit(region, day)``; a visit given as None cannot be expressed in row form, so it is sent as a
    visit without region and day (still INVALID_INPUT).  ``registered_commuter`` None is sent as false (SPEC §3).
    """
    p = pb.Person()
    pid = row.get("person_id", index + 1)
    if pid is not None:
        p.person_id = pid
    home = row.get("home_region", 131082)
    if home is not None:
        p.home_region = home
    p.registered_commuter = bool(row.get("registered_commuter", False))
    color = row.get("base_color", 0)
    if color is not None:
        p.base_color = color
    for name in ("nat_sample_time", "nat_report_time"):
        v = row.get(name)
        if v is not None:
            getattr(p, name).CopyFrom(ts(v))
    for t in row.get("entry_times", []) or []:
        if t is None:
            raise ValueError("a null entry instant cannot be sent in row form")
        p.entry_times.append(ts(t))
    for v in row.get("visits", []) or []:
        visit = p.visits.add()
        if v is None:
            continue
        region, d = v
        if region is not None:
            visit.region = region
        if d is not None:
            if isinstance(d, int):
                d = EPOCH_DATE + dt.timedelta(days=d)
            visit.day.year, visit.day.month, visit.day.day = d.year, d.month, d.day
    return p


def persons(rows: Iterable[Mapping[str, Any]]) -> list[pb.Person]:
    return [person(r, i) for i, r in enumerate(rows)]


def status_as_row(s: pb.Status) -> dict[str, Any]:
    """A Status message as a dict comparable with an engine result row (valid-until as epoch seconds)."""
    return {
        "person_id": s.person_id,
        "commuter_badge": s.commuter_badge,
        "entry_permitted": s.entry_permitted,
        "enrolled": s.enrolled,
        "reasons": s.reasons_mask,
        "badge_valid_until": s.badge_valid_until.seconds if s.HasField("badge_valid_until") else None,
        "entry_valid_until": s.entry_valid_until.seconds if s.HasField("entry_valid_until") else None,
        "error": s.error or None,
    }


def result_rows(result: pa.Table) -> list[dict[str, Any]]:
    """Engine result rows with valid-until as epoch seconds (and a null person_id as 0, as the wire sends it)."""
    cast = result.set_column(
        result.schema.get_field_index("badge_valid_until"),
        "badge_valid_until",
        result["badge_valid_until"].cast(pa.int64()),
    )
    cast = cast.set_column(
        cast.schema.get_field_index("entry_valid_until"),
        "entry_valid_until",
        cast["entry_valid_until"].cast(pa.int64()),
    )
    rows = cast.to_pylist()
    for r in rows:
        if r["person_id"] is None:
            r["person_id"] = 0
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Arrow IPC


def ipc_bytes(table: pa.Table | pa.RecordBatch, schema: pa.Schema | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    batches = table.to_batches() if isinstance(table, pa.Table) else [table]
    with pa.ipc.new_stream(sink, schema or table.schema) as writer:
        for b in batches:
            writer.write_batch(b)
    return sink.getvalue().to_pybytes()


def arrow_requests(
    table: pa.Table,
    rows_per_message: int,
    *,
    as_of: int | None = None,
    policy: str = "",
    options_alone: bool = True,
) -> Iterator[pb.EvaluateArrowRequest]:
    """Options first, then one complete IPC stream per ``rows_per_message`` rows."""
    options = pb.EvaluateOptions(policy=policy)
    if as_of is not None:
        options.as_of.seconds = as_of
    chunks = [table.slice(i, rows_per_message) for i in range(0, table.num_rows, rows_per_message)]
    if options_alone:
        yield pb.EvaluateArrowRequest(options=options)
    for i, chunk in enumerate(chunks):
        if i == 0 and not options_alone:
            yield pb.EvaluateArrowRequest(options=options, arrow_ipc=ipc_bytes(chunk))
        else:
            yield pb.EvaluateArrowRequest(arrow_ipc=ipc_bytes(chunk))


def collect_arrow(responses: Iterable[pb.EvaluateArrowResponse]) -> tuple[pa.Table, pb.EvaluationInfo, list[int]]:
    """The result table, the info of the first response, and the size of every response message."""
    info = None
    batches: list[pa.RecordBatch] = []
    sizes: list[int] = []
    for i, r in enumerate(responses):
        sizes.append(r.ByteSize())
        if r.HasField("info"):
            assert i == 0, "info must come in the first response only"
            info = r.info
        if r.arrow_ipc:
            got = list(pa.ipc.open_stream(pa.py_buffer(r.arrow_ipc)))
            assert sum(b.num_rows for b in got) == r.rows
            batches.extend(got)
    assert info is not None, "no response carried the EvaluationInfo"
    return pa.Table.from_batches(batches, schema=RESULT_SCHEMA), info, sizes


# ----------------------------------------------------------------------------------------------------------------
# TLS material and secured channels (test_security, test_limits)


class Pki:
    """A CA, a server certificate for localhost/127.0.0.1 and client certificates, as PEM files in ``folder``:
    ``trusted`` (CN gw-1, signed by the CA), ``admin-cert`` (CN ops-1), ``untrusted`` (CN gw-1, signed by another
    CA), ``expired`` (CN gw-1, signed by the CA, validity over); ``path(name, "crt"|"key")``."""

    def __init__(self, folder: Path) -> None:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.timezone.utc)

        def write(name: str, cert: Any, key: Any) -> None:
            (self.folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            (self.folder / f"{name}.key").write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )

        def name(cn: str) -> Any:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def ca(cn: str) -> tuple[Any, Any]:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
                .sign(key, hashes.SHA256())
            )  # fmt: skip
            return cert, key

        def leaf(cn: str, issuer: tuple[Any, Any], server: bool, *, expired: bool = False) -> tuple[Any, Any]:
            key = ec.generate_private_key(ec.SECP256R1())
            start, end = (now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired else (
                now - dt.timedelta(days=1), now + dt.timedelta(days=30))  # fmt: skip
            sans: list[Any] = [x509.DNSName(cn)]
            if server:
                sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            cert = (
                x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer[0].subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(issuer[1], hashes.SHA256())
            )  # fmt: skip
            return cert, key

        root = ca("healthcode test CA")
        other = ca("some other CA")
        write("ca", *root)
        write("other-ca", *other)
        write("server", *leaf("localhost", root, True))
        write("trusted", *leaf("gw-1", root, False))
        write("admin-cert", *leaf("ops-1", root, False))
        write("unknown-cert", *leaf("stranger", root, False))
        write("untrusted", *leaf("gw-1", other, False))
        write("expired", *leaf("gw-1", root, False, expired=True))

    def path(self, name: str, kind: str = "crt") -> str:
        return str(self.folder / f"{name}.{kind}")

    def server_args(self, *, mutual: bool = False) -> list[str]:
        args = ["--tls-cert", self.path("server"), "--tls-key", self.path("server", "key")]
        return args + (["--tls-client-ca", self.path("ca")] if mutual else [])

    def channel(self, address: str, client: str | None = None, token: str | None = None) -> grpc.Channel:
        """A TLS channel trusting the test CA (with ``client``'s certificate, and a bearer token, when given)."""
        from healthcode.client import make_channel

        cert = None if client is None else self.path(client)
        key = None if client is None else self.path(client, "key")
        return make_channel(address, tls_ca=self.path("ca"), tls_cert=cert, tls_key=key, token=token)


def token_channel(address: str, token: str | None) -> grpc.Channel:
    """A plaintext channel whose calls carry ``authorization: Bearer <token>`` (none when ``token`` is None)."""
    from healthcode.client import make_channel

    return make_channel(address, token=token)


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


class RawGrpc:
    """A raw HTTP/2 connection whose gRPC calls send their headers and, if given, one message, and then nothing at
    all: neither more messages, nor the end of the stream, nor a cancellation, whatever happens (a grpc client
    ends its call at its deadline; these leave it to the server).  The server's frames are never read."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0))  # preface, empty SETTINGS
        while True:  # acknowledge the server's SETTINGS
            head = self.sock.recv(9, socket.MSG_WAITALL)
            length = int.from_bytes(head[:3], "big")
            if length:
                self.sock.recv(length, socket.MSG_WAITALL)
            if head[3] == 4 and not head[4] & 1:
                self.sock.sendall(_frame(4, 1, 0))
                break
        self.next_stream = 1

    def call(self, path: str, headers: Sequence[tuple[str, str]] = (), message: bytes | None = None) -> None:
        def literal(name: bytes, value: bytes) -> bytes:  # HPACK: literal without indexing, new name, no Huffman
            assert len(name) < 127 and len(value) < 127
            return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

        fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
                  ("content-type", "application/grpc"), ("te", "trailers"), *headers]  # fmt: skip
        stream, self.next_stream = self.next_stream, self.next_stream + 2
        block = b"".join(literal(k.encode(), v.encode()) for k, v in fields)
        self.sock.sendall(_frame(1, 0x4, stream, block))  # HEADERS, END_HEADERS, no END_STREAM
        if message is not None:  # DATA, no END_STREAM: a gRPC message (not compressed, length-prefixed)
            self.sock.sendall(_frame(0, 0, stream, b"\0" + len(message).to_bytes(4, "big") + message))

    def close(self) -> None:
        self.sock.close()
