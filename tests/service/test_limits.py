"""Request limits against a real ``healthcode serve``: message size, rows per request, concurrent calls (overall and
per caller) answered at once with RESOURCE_EXHAUSTED naming the limit, health never shed; plus the settings.

One module server (``limited``): 64 KiB messages, 100 rows per request, 2 concurrent calls overall and 1 per caller,
three token principals, and an empty store (so the ingest RPCs get as far as decoding their Arrow payload).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pyarrow as pa
import pytest
from conftest import AS_OF, make_population, seconds
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_helpers import ServerProcess, ipc_bytes, token_channel

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc
from healthcode.service.config import ConfigError, Settings, load_settings
from healthcode.service.limits import Concurrency
from healthcode.wire.limits import LimitExceeded

AS_OF_S = seconds(AS_OF)
TOKENS = {"gw-a": "tok-gateway-a-0123456789abcdef", "gw-b": "tok-gateway-b-0123456789abcdef",
          "ops": "tok-admin-0123456789abcdef"}  # fmt: skip
ROLES = {"gw-a": "gateway", "gw-b": "gateway", "ops": "admin"}
LIMIT_BYTES = 64 * 1024
LIMIT_ROWS = 100


def code_of(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


def _request(n: int) -> pb.EvaluateRequest:
    request = pb.EvaluateRequest(persons=[pb.Person(person_id=i + 1, home_region=131082) for i in range(n)])
    request.as_of.seconds = AS_OF_S
    return request


@pytest.fixture(scope="module")
def limited(tmp_path_factory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("limited")
    tokens = work / "tokens"
    tokens.write_text("".join(f"{n} {ROLES[n]} {t}\n" for n, t in TOKENS.items()), encoding="utf-8")
    tokens.chmod(0o600)
    args = ["--tokens-file", str(tokens), "--max-request-rows", str(LIMIT_ROWS), "--max-concurrent-calls", "2"]
    srv = ServerProcess(
        work,
        env={"HEALTHCODE_MAX_MESSAGE_BYTES": str(LIMIT_BYTES), "HEALTHCODE_MAX_CONCURRENT_CALLS_PER_CALLER": "1"},
        extra_args=[*args, "--store", str(work / "store.duckdb")],
        name="limited",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stubs(limited) -> Iterator[dict[str, pb_grpc.HealthCodeServiceStub]]:
    channels = {name: token_channel(limited.address, token) for name, token in TOKENS.items()}
    yield {name: pb_grpc.HealthCodeServiceStub(c) for name, c in channels.items()}
    for c in channels.values():
        c.close()


# ----------------------------------------------------------------------------------------------------------------
# Size and rows


def test_over_size_message_is_resource_exhausted(limited, stubs):
    request = _request(1)
    for i in range(LIMIT_BYTES // 8):
        request.persons[0].entry_times.add(seconds=AS_OF_S - i)
    assert request.ByteSize() > LIMIT_BYTES
    code, _ = code_of(lambda: stubs["gw-a"].Evaluate(request, timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_too_many_row_form_persons(limited, stubs):
    assert len(stubs["gw-a"].Evaluate(_request(LIMIT_ROWS), timeout=10).statuses) == LIMIT_ROWS
    code, message = code_of(lambda: stubs["gw-a"].Evaluate(_request(LIMIT_ROWS + 1), timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_request_rows" in message and "100" in message


def test_too_many_rows_in_one_arrow_message(limited, stubs):
    table = make_population([{"person_id": i + 1} for i in range(LIMIT_ROWS + 1)])

    def requests(rows: int) -> Iterator[pb.EvaluateArrowRequest]:
        first = pb.EvaluateArrowRequest(options=pb.EvaluateOptions())
        first.options.as_of.seconds = AS_OF_S
        yield first
        yield pb.EvaluateArrowRequest(arrow_ipc=ipc_bytes(table.slice(0, rows)))

    replies = list(stubs["gw-a"].EvaluateArrow(requests(LIMIT_ROWS), timeout=10))
    assert sum(r.rows for r in replies) == LIMIT_ROWS
    code, message = code_of(lambda: list(stubs["gw-a"].EvaluateArrow(requests(LIMIT_ROWS + 1), timeout=10)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_request_rows" in message and "arrow_ipc" in message


def test_too_many_rows_in_ingest_and_status_requests(limited, stubs):
    ops = stubs["ops"]
    persons = [pb.PersonRecord(person_id=i + 1, home_region=131082) for i in range(LIMIT_ROWS + 1)]
    code, message = code_of(lambda: ops.UpsertPersons(pb.UpsertPersonsRequest(persons=persons), timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "UpsertPersons: persons" in message
    visits = ipc_bytes(pa.table({"person_id": pa.array(range(LIMIT_ROWS + 1), pa.uint64())}))
    code, message = code_of(lambda: ops.RecordVisits(pb.RecordVisitsRequest(arrow_ipc=visits), timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_request_rows" in message
    ids = list(range(1, LIMIT_ROWS + 2))
    code, message = code_of(lambda: ops.GetStatus(pb.GetStatusRequest(person_ids=ids), timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "GetStatus: person_ids" in message
    # Under the limit the same calls go through.
    assert ops.UpsertPersons(pb.UpsertPersonsRequest(persons=persons[:LIMIT_ROWS]), timeout=10).inserted == LIMIT_ROWS


# ----------------------------------------------------------------------------------------------------------------
# Concurrency


class Held:
    """An EvaluateArrow call kept in flight: the first request is sent, the rest waits for :meth:`release`."""

    def __init__(self, stub: pb_grpc.HealthCodeServiceStub) -> None:
        self.go = threading.Event()

        def requests() -> Iterator[pb.EvaluateArrowRequest]:
            first = pb.EvaluateArrowRequest(options=pb.EvaluateOptions())
            first.options.as_of.seconds = AS_OF_S
            yield first
            self.go.wait(20)

        self.call = stub.EvaluateArrow(requests(), timeout=30)
        assert next(self.call).HasField("info")  # the server is inside the call: the slot is taken

    def release(self) -> None:
        self.go.set()
        list(self.call)


def _eventually_ok(call) -> None:  # type: ignore[no-untyped-def]
    """A released slot is free again shortly after (the server hears of a cancellation asynchronously)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            call()
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_concurrency_limits_refuse_at_once_and_recover(limited, stubs):
    a = Held(stubs["gw-a"])
    try:
        code, message = code_of(lambda: stubs["gw-a"].Evaluate(_request(1), timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_calls_per_caller = 1" in message and "gw-a" in message
        b = Held(stubs["gw-b"])
        try:
            for name in ("ops", "gw-a", "gw-b"):
                started = time.monotonic()
                code, message = code_of(lambda n=name: stubs[n].Evaluate(_request(1), timeout=10))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() - started < 1.0, "refused calls must not queue"
            code, message = code_of(lambda: stubs["ops"].Evaluate(_request(1), timeout=10))
            assert "max_concurrent_calls = 2" in message
            # Health is never shed, and needs no credentials.
            with grpc.insecure_channel(limited.address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            b.release()
    finally:
        a.release()
    _eventually_ok(lambda: stubs["ops"].Evaluate(_request(1), timeout=10))
    assert len(stubs["gw-a"].Evaluate(_request(2), timeout=10).statuses) == 2
    refused = [line for line in limited.rpc_log_lines() if "RESOURCE_EXHAUSTED" in line]
    assert len(refused) >= 5


def test_a_cancelled_call_gives_its_slot_back(limited, stubs):
    held = Held(stubs["gw-a"])
    held.call.cancel()
    held.go.set()
    _eventually_ok(lambda: stubs["gw-a"].Evaluate(_request(1), timeout=10))
    watch = stubs["gw-b"].WatchChanges(pb.WatchChangesRequest(from_sequence=1 << 40), timeout=0.5)
    code, _ = code_of(lambda: list(watch))  # a stream held until its deadline, then its slot is free again
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    _eventually_ok(lambda: stubs["gw-b"].Evaluate(_request(1), timeout=10))


def test_refused_request_streams_read_the_refusal_not_internal(limited, stubs):
    """A grpc.aio client still writing its first request when the server ends the call reads INTERNAL "Internal
    error from Core" instead of the server's code (grpc/grpc#36066: 149 of 400 refused streams before the server
    waited for the first request).  Past the limit, a stream that sends its options and waits for the answer, as
    our clients do, reads RESOURCE_EXHAUSTED every time; one that sends nothing ends at its deadline."""
    import asyncio

    first = pb.EvaluateArrowRequest(options=pb.EvaluateOptions())
    first.options.as_of.seconds = AS_OF_S
    metadata = (("authorization", f"Bearer {TOKENS['gw-a']}"),)

    async def refusals() -> tuple[dict[str, int], grpc.StatusCode]:
        codes: dict[str, int] = {}
        async with grpc.aio.insecure_channel(limited.address) as channel:
            stub = pb_grpc.HealthCodeServiceStub(channel)

            async def one() -> None:
                answered = asyncio.Event()

                async def requests() -> Any:
                    yield first
                    await answered.wait()

                try:
                    async for _ in stub.EvaluateArrow(requests(), timeout=10, metadata=metadata):
                        answered.set()
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                finally:
                    answered.set()
                codes[code] = codes.get(code, 0) + 1

            async def caller() -> None:
                for _ in range(50):
                    await one()

            await asyncio.gather(*(caller() for _ in range(4)))

            async def nothing() -> Any:
                await asyncio.sleep(5)
                return
                yield

            try:
                async for _ in stub.EvaluateArrow(nothing(), timeout=0.5, metadata=metadata):
                    pass
                silent = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                silent = exc.code()
        return codes, silent

    held = Held(stubs["gw-a"])  # gw-a's one slot is taken: every stream below is refused
    try:
        codes, silent = asyncio.run(refusals())
    finally:
        held.release()
    assert codes == {"RESOURCE_EXHAUSTED": 200}, codes
    assert silent == grpc.StatusCode.DEADLINE_EXCEEDED
    _eventually_ok(lambda: stubs["gw-a"].Evaluate(_request(1), timeout=10))


# ----------------------------------------------------------------------------------------------------------------
# Settings and the in-process limiter


def test_limit_settings_from_file_env_and_flags(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text(
        "[server]\nmax_request_rows = 5000\nkeepalive_time_ms = 30000\nmax_connection_age_ms = 0\n"
        'tls_cert = "s.crt"\ntls_key = "s.key"\ntls_client_ca = "ca.crt"\n'
        'client_roles = { "gw-1.example" = "gateway", ops = "admin+ingest" }\n',
        encoding="utf-8",
    )
    s = load_settings(str(config), env={"HEALTHCODE_MAX_CONCURRENT_CALLS": "8"}, overrides={"max_request_rows": 7})
    assert (s.max_request_rows, s.max_concurrent_calls, s.keepalive_time_ms) == (7, 8, 30000)
    assert s.client_roles == "gw-1.example=gateway,ops=admin+ingest"
    from healthcode.service.transport import grpc_options

    options = dict(grpc_options(s))
    assert options["grpc.keepalive_time_ms"] == 30000 and "grpc.max_connection_age_ms" not in options
    defaults = dict(grpc_options(Settings()))
    assert defaults["grpc.max_connection_age_ms"] == 30 * 60_000
    assert defaults["grpc.max_receive_message_length"] == defaults["grpc.max_send_message_length"] == 4 << 20
    with pytest.raises(ConfigError, match="HEALTHCODE_MAX_REQUEST_ROWS"):
        load_settings(env={"HEALTHCODE_MAX_REQUEST_ROWS": "-1"})
    with pytest.raises(ConfigError, match="tokens"):
        config.write_text('[server]\ntokens = "x"\n', encoding="utf-8")
        load_settings(str(config), env={})


def test_concurrency_counter():
    c = Concurrency(max_total=3, max_per_caller=2)
    c.acquire("a")
    c.acquire("a")
    with pytest.raises(LimitExceeded, match="max_concurrent_calls_per_caller = 2"):
        c.acquire("a")
    c.acquire("b")
    with pytest.raises(LimitExceeded, match="max_concurrent_calls = 3"):
        c.acquire("c")
    for who in ("a", "a", "b"):
        c.release(who)
    assert c.total == 0 and c.by_caller == {}
    unlimited = Concurrency(0, 0)
    for _ in range(1000):
        unlimited.acquire("x")
    assert unlimited.total == 1000


def test_control_plane_is_counted_but_not_held_to_the_overall_limit():
    c = Concurrency(max_total=1, max_per_caller=2)
    c.acquire("gw")
    c.acquire("ops", control=True)  # a risk-list update while the data plane is full
    assert c.total == 2
    with pytest.raises(LimitExceeded, match="max_concurrent_calls = 1"):
        c.acquire("gw2")
    c.acquire("ops", control=True)
    with pytest.raises(LimitExceeded, match="max_concurrent_calls_per_caller = 2"):
        c.acquire("ops", control=True)  # the per-caller limit still holds


def test_work_for_a_call_past_its_deadline_is_not_started():
    """Queued evaluation work checks the caller's deadline before it starts (and a bulk request between batches):
    a caller that has gone costs no kernel time."""
    from concurrent.futures import ThreadPoolExecutor

    from healthcode.errors import Expired
    from healthcode.live.control import Control
    from healthcode.live.state import State
    from healthcode.rules import policy
    from healthcode.rules.regions import parse_risk_csv
    from healthcode.service.servicer import HealthCodeService

    state = State(parse_risk_csv("region,start_date,end_date,kind\n"), policy.default_policy(), "")
    with ThreadPoolExecutor(1) as executor:
        service = HealthCodeService(Control(state), Settings(), executor)
        request = pb.EvaluateRequest(persons=[pb.Person(person_id=1, home_region=110105)]).SerializeToString()
        assert service._evaluate_rows(request, time.monotonic() + 60)[1] == 1  # in time: evaluated
        for call in (
            lambda: service._evaluate_rows(request, time.monotonic() - 0.001),
            lambda: service._evaluate_ipc(b"", None, 0, time.monotonic() - 0.001),  # type: ignore[arg-type]
        ):
            with pytest.raises(Expired, match="deadline passed") as refused:
                call()
            assert refused.value.status == "DEADLINE_EXCEEDED"


def test_overload_guard_sheds_data_plane_calls_while_the_event_loop_stays_late():
    """A loop that is late at every wake-up for a while sheds Evaluate (and bulk calls first), never the control
    plane, and admits again once the loop catches up; one slow callback alone sheds nothing."""
    import asyncio

    from healthcode.service.limits import Overload

    async def scenario() -> list[str]:
        guard = Overload(threshold=0.02, interval=0.002, window=0.1)
        guard.start()
        seen = []
        try:
            await asyncio.sleep(0.05)
            guard.check("Evaluate")  # idle loop: admitted
            time.sleep(0.1)  # one long callback
            await asyncio.sleep(0.005)
            guard.check("Evaluate")  # a single late wake-up is not an overload
            seen.append("single spike admitted")
            for _ in range(12):  # the loop is busy for a while: every wake-up is late
                time.sleep(0.03)
                await asyncio.sleep(0)
            for method in ("Evaluate", "EvaluateArrow", "PutRiskList"):
                try:
                    guard.check(method)
                    seen.append(f"{method} admitted")
                except LimitExceeded as exc:
                    assert exc.status == "RESOURCE_EXHAUSTED" and "shed_loop_lag_ms" in str(exc)
                    seen.append(f"{method} shed")
            await asyncio.sleep(0.1)  # the loop catches up
            guard.check("Evaluate")
            seen.append("recovered")
        finally:
            guard.stop()
        return seen

    assert asyncio.run(scenario()) == [
        "single spike admitted", "Evaluate shed", "EvaluateArrow shed", "PutRiskList admitted", "recovered",
    ]
