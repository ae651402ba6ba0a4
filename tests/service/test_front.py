"""The shedding front (healthcode.service.front) against real ``healthcode serve --front on`` processes.

* Calls go through unchanged: replies, error codes and details, UNIMPLEMENTED for unknown methods.
* Past ``--max-concurrent-calls`` data-plane calls in flight, the front answers RESOURCE_EXHAUSTED naming the
  limit; health checks and the control plane still go through; a slot comes back when its call ends.
* Under mutual TLS the front passes the verified certificate names on and drops forged ``x-healthcode-*``
  metadata.
* A killed front is replaced on the same port; a killed server takes its front with it.
* ``front = auto`` puts a non-loopback server behind a front; a bad value is a clear start-up error.

The rest of the service suite can run behind the front too: ``HEALTHCODE_TEST_FRONT=on pytest tests`` (``make
test`` runs the service, security and overload tests that way).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import AS_OF, seconds
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_helpers import Pki, RawGrpc, ServerProcess, healthcode_cmd

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc
from healthcode.service.front import EXEMPT, Slots, install_fast_refusal

LIMIT = 2
RISK_CSV = "region,start_date,end_date,kind\n130102,2021-11-25,,local_case\n"


def _evaluate_request() -> pb.EvaluateRequest:
    request = pb.EvaluateRequest(persons=[pb.Person(person_id=7, home_region=131082, registered_commuter=True)])
    request.as_of.seconds = seconds(AS_OF)
    return request


def _health(channel: grpc.Channel) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return int(reply.status)


def _error(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


def _front_pids(srv: ServerProcess) -> list[int]:
    return [int(p) for p in re.findall(r'"event": "front", "pid": (\d+)', srv.stderr())]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        tmp_path_factory.mktemp("front"),
        risk_csv=RISK_CSV,
        extra_args=["--front", "on", "--max-concurrent-calls", str(LIMIT)],
        name="front",
    )
    yield srv
    srv.stop()


class Holder:
    """An EvaluateArrow stream that has been admitted (its first reply arrived) and stays open until released."""

    def __init__(self, stub: pb_grpc.HealthCodeServiceStub, timeout: float = 60) -> None:
        self.release = threading.Event()

        def requests() -> Iterator[pb.EvaluateArrowRequest]:
            first = pb.EvaluateArrowRequest()
            first.options.as_of.seconds = seconds(AS_OF)
            yield first
            self.release.wait(30)

        self.call = stub.EvaluateArrow(requests(), timeout=timeout)
        first = next(self.call)
        assert first.HasField("info"), first

    def end(self) -> None:
        self.release.set()
        for _ in self.call:
            pass


def _all_admitted(stub: pb_grpc.HealthCodeServiceStub, n: int, within: float = 10) -> None:
    """``n`` Evaluate calls at once all succeed, within ``within`` s (a slot comes back a moment after its call)."""
    deadline = time.monotonic() + within
    while True:
        calls = [stub.Evaluate.future(_evaluate_request(), timeout=10) for _ in range(n)]
        try:
            assert all(len(call.result().statuses) == 1 for call in calls)
            return
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, exc
            time.sleep(0.05)


def test_slots_count_refusals_and_release_once():
    counters = [0, 0]
    slots = Slots(2, counters)
    a, b = slots.acquire(), slots.acquire()
    assert a is not None and b is not None
    assert slots.acquire() is None and counters == [2, 1]
    a()
    a()  # the end of the call and its cancellation callback both release: counted once
    assert slots.active == 1
    assert slots.acquire() is not None and slots.acquire() is None
    assert counters == [3, 2]
    assert "max_concurrent_calls = 2" in slots.message
    unlimited = Slots(0, [0, 0])
    assert all(unlimited.acquire() is not None for _ in range(100))


def test_fast_refusal_fits_this_grpcio(monkeypatch):
    """The front refuses on grpcio's accept thread by wrapping a grpcio internal; with a grpcio whose internals
    differ it falls back to refusing in the handlers (slower) and warns.  This pins the fast path to the grpcio
    this project installs: an upgrade that changes the internals fails here, not silently in production."""
    from grpc import _server

    monkeypatch.setattr(_server, "_handle_call", _server._handle_call)  # put back after the test
    slots = Slots(1, [0, 0])
    assert install_fast_refusal(slots), f"grpcio {grpc.__version__}: the accept-thread refusal does not fit"
    assert "/healthcode.v1.HealthCodeService/Evaluate" in slots.on_accept
    assert "/healthcode.v1.HealthCodeService/GetStatus" in slots.on_accept
    assert "/healthcode.v1.HealthCodeService/EvaluateArrow" not in slots.on_accept  # a request stream: in the handler
    assert not slots.on_accept & EXEMPT


def test_calls_go_through_the_front_unchanged(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.HealthCodeServiceStub(channel)
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        reply = stub.Evaluate(_evaluate_request(), timeout=10)
        assert [s.person_id for s in reply.statuses] == [7] and reply.info.risk_list_version == 1
        # An error from the server reaches the caller with its code and details.
        bad = "region,start_date,end_date,kind\n130102,2021-13-01,,local_case\n"
        code, message = _error(lambda: stub.PutRiskList(pb.PutRiskListRequest(csv=bad), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "line 2" in message, message
        # A method nobody serves.
        code, _ = _error(lambda: channel.unary_unary("/healthcode.v1.HealthCodeService/Nope")(b"", timeout=10))
        assert code == grpc.StatusCode.UNIMPLEMENTED
        # The caller's deadline travels with the call: streams that outlive it end with DEADLINE_EXCEEDED, and their
        # slots, in the front and in the server, come back (the release may trail the end by a moment).
        holders = [Holder(stub, timeout=1.0) for _ in range(LIMIT)]
        for holder in holders:
            code, _ = _error(lambda: list(holder.call))  # noqa: B023 - called at once
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, code
            holder.release.set()
        _all_admitted(stub, LIMIT)
    assert re.search(r'healthcode_front_calls_total\{outcome="forwarded"\} [1-9]', server.metrics())
    assert "front_slow_refusal" not in server.stderr()


def test_front_sheds_past_the_limit_but_never_health_or_control_plane(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.HealthCodeServiceStub(channel)
        holders = [Holder(stub) for _ in range(LIMIT)]
        try:
            for _ in range(5):
                code, message = _error(lambda: stub.Evaluate(_evaluate_request(), timeout=10))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, message)
                assert f"max_concurrent_calls = {LIMIT}" in message, message
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
            version = stub.PutRiskList(pb.PutRiskListRequest(csv=RISK_CSV), timeout=10).version
            assert version >= 2
        finally:
            holders[0].end()
        _all_admitted(stub, 1)  # the slot of the ended stream is free again
        holders[1].call.cancel()  # a cancelled call gives its slot back too
        holders[1].release.set()
        _all_admitted(stub, LIMIT)
    metrics = server.metrics()
    refused = re.search(r'healthcode_front_calls_total\{outcome="refused"\} (\d+)', metrics)
    assert refused and int(refused.group(1)) >= 5, metrics


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def test_certificate_names_are_forwarded_and_forged_ones_dropped(tmp_path, pki):
    srv = ServerProcess(
        tmp_path,
        risk_csv=RISK_CSV,
        extra_args=[*pki.server_args(mutual=True), "--client-roles", "gw-1=gateway,ops-1=admin", "--front", "on"],
        name="mtls-front",
    )
    try:
        forged = [("x-healthcode-client-name", "ops-1"), ("x-healthcode-peer", "ipv4:10.0.0.1:1")]
        with pki.channel(srv.address, client="trusted") as channel:  # the gw-1 certificate: gateway
            stub = pb_grpc.HealthCodeServiceStub(channel)
            assert len(stub.Evaluate(_evaluate_request(), timeout=10).statuses) == 1
            code, message = _error(
                lambda: stub.PutRiskList(pb.PutRiskListRequest(csv=RISK_CSV), timeout=10, metadata=forged)
            )
            assert code == grpc.StatusCode.PERMISSION_DENIED and "gw-1" in message, message
        with pki.channel(srv.address, client="admin-cert") as channel:
            assert pb_grpc.HealthCodeServiceStub(channel).PutRiskList(pb.PutRiskListRequest(csv=RISK_CSV)).version == 2
        with pki.channel(srv.address, client="untrusted") as channel:  # refused in the front's handshake
            code, _ = _error(lambda: pb_grpc.HealthCodeServiceStub(channel).Evaluate(_evaluate_request(), timeout=10))
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def _nice(pid: int) -> int:
    """The nice value of a process (of its main thread)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[16])


def test_a_killed_front_is_replaced_and_a_killed_server_takes_its_front_along(tmp_path):
    srv = ServerProcess(tmp_path, risk_csv=RISK_CSV, extra_args=["--front", "on"], name="restart")
    try:
        (first,) = _front_pids(srv)
        first_nice = _nice(first)
        assert _nice(srv.proc.pid) == min(19, first_nice + 5)  # the server yields the CPU to its front
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while len(_front_pids(srv)) < 2:
            assert time.monotonic() < deadline, srv.stderr()
            time.sleep(0.1)
        assert '"event": "front_exited"' in srv.stderr()
        with grpc.insecure_channel(srv.address) as channel:  # the same address answers again
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
            assert len(pb_grpc.HealthCodeServiceStub(channel).Evaluate(_evaluate_request(), timeout=10).statuses) == 1
        second = _front_pids(srv)[-1]
        assert _nice(second) == first_nice, "the new front lost the priority the first one had"
        srv.proc.kill()
        srv.proc.wait(10)
        deadline = time.monotonic() + 15
        while _alive(second):
            assert time.monotonic() < deadline, "the front outlived its server"
            time.sleep(0.1)
    finally:
        srv.stop()


def test_front_auto_on_a_public_address_and_bad_values(tmp_path):
    srv = ServerProcess(tmp_path, extra_args=["--listen", "0.0.0.0:0"], name="auto")
    try:
        assert _front_pids(srv), srv.stderr()
        assert '"front": true' in srv.stderr()
    finally:
        srv.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHCODE_")}
    proc = subprocess.run(
        [*healthcode_cmd(), "serve", "--listen", "127.0.0.1:0", "--metrics-listen", ""],
        env={**env, "HEALTHCODE_FRONT": "sometimes"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "HEALTHCODE_FRONT: front: expected auto, on or off, got 'sometimes'" in proc.stderr or (
        "front: expected auto, on or off" in proc.stderr
    ), proc.stderr


def test_a_front_that_cannot_listen_stops_the_server_with_a_clear_error(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHCODE_")}
        started = time.monotonic()
        proc = subprocess.run(
            [*healthcode_cmd(), "serve", "--listen", f"127.0.0.1:{port}", "--metrics-listen", "", "--front", "on"],
            env=env, capture_output=True, text=True, timeout=90, cwd=tmp_path,
        )  # fmt: skip
    assert proc.returncode != 0, proc.stdout
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "healthcode serving" not in proc.stdout
    assert time.monotonic() - started < 60  # reported as soon as the front fails, not after a timeout


def test_a_stream_that_never_sends_is_cancelled_by_the_front(server):
    """Until a request stream's first message arrives, the call is in the front only (nobody has authenticated it
    yet): after FIRST_MESSAGE_SECONDS without one, the front cancels it and frees its thread."""
    from healthcode.service.front import FIRST_MESSAGE_SECONDS

    release = threading.Event()

    def nothing() -> Iterator[pb.EvaluateArrowRequest]:
        release.wait(60)
        return
        yield  # a generator that sends nothing

    with grpc.insecure_channel(server.address) as channel:
        started = time.monotonic()
        call = pb_grpc.HealthCodeServiceStub(channel).EvaluateArrow(nothing(), timeout=60)
        try:
            code, _ = _error(lambda: list(call))
        finally:
            release.set()
        waited = time.monotonic() - started
        assert code == grpc.StatusCode.CANCELLED, code
        assert FIRST_MESSAGE_SECONDS - 1 < waited < FIRST_MESSAGE_SECONDS + 10, waited
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_calls_that_never_send_their_request_lose_their_slot(server):
    """A slot is taken as the front accepts a call; a caller that sends the headers and never the message is
    cancelled after FIRST_MESSAGE_SECONDS, so such callers cannot keep the data plane refused."""
    from healthcode.service.front import FIRST_MESSAGE_SECONDS

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.HealthCodeServiceStub(channel)
        _all_admitted(stub, LIMIT)  # warm
        # The silent calls must hold every slot.  A slot comes back a moment after its call ended, and a silent call
        # that found none was refused at once: add silent calls until the data plane is refused.
        raw = RawGrpc(server.address)
        for _attempt in range(20):
            for _ in range(LIMIT):
                raw.call("/healthcode.v1.HealthCodeService/Evaluate")
            deadline = time.monotonic() + 0.5
            try:
                while time.monotonic() < deadline:
                    stub.Evaluate(_evaluate_request(), timeout=10)
                    time.sleep(0.05)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                break  # the silent calls hold every slot
        else:
            raw.close()
            raise AssertionError("the silent calls never held the slots")
        try:
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
            _all_admitted(stub, LIMIT, within=FIRST_MESSAGE_SECONDS + 10)
        finally:
            raw.close()
    deadline = time.monotonic() + 5  # the front logs the cancellation just after it frees the slots
    while '"event": "front_no_request"' not in server.stderr():
        assert time.monotonic() < deadline, "the front did not log the cancelled calls"
        time.sleep(0.05)


def test_a_front_that_cannot_listen_closes_the_store_cleanly(tmp_path):
    """The same with a store: the server closes it before it exits, and the store opens again."""
    import socket

    from healthcode.store import Store

    store = tmp_path / "store.duckdb"
    Store(str(store)).close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHCODE_")}
        proc = subprocess.run(
            [*healthcode_cmd(), "serve", "--listen", f"127.0.0.1:{port}", "--metrics-listen", "", "--front", "on",
             "--store", str(store)],
            env=env, capture_output=True, text=True, timeout=90, cwd=tmp_path,
        )  # fmt: skip
    assert proc.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    Store(str(store)).close()  # not left locked or damaged
