"""TLS, mutual TLS, bearer-token roles and start-up warnings, against real ``healthcode serve`` subprocesses.

Certificates (a CA, a server certificate, trusted / untrusted / expired client certificates) are made at test time
with ``cryptography`` (service_helpers.Pki).  Servers:

* ``tls_server`` (module): TLS, bearer tokens from a file (one given as its SHA-256 digest) and from
  ``HEALTHCODE_TOKENS``.
* ``mtls_server`` (module): mutual TLS, certificate identities mapped to roles with ``--client-roles``.
* small plaintext servers for reflection off, the non-loopback warning and bad settings.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import AS_OF, seconds
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_helpers import Pki, ServerProcess, healthcode_cmd, token_channel

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc

AS_OF_S = seconds(AS_OF)
GATEWAY = "gw-" + secrets.token_urlsafe(24)
INGEST = "in-" + secrets.token_urlsafe(24)
ADMIN = "ad-" + secrets.token_urlsafe(24)  # in the file as its sha256 digest only
ENV_ADMIN = "ev-" + secrets.token_urlsafe(24)  # from HEALTHCODE_TOKENS
WRONG = "wr-" + secrets.token_urlsafe(24)
RISK_CSV = "region,start_date,end_date,kind\n130102,2021-11-25,,local_case\n"


def _evaluate_request() -> pb.EvaluateRequest:
    request = pb.EvaluateRequest(persons=[pb.Person(person_id=1, home_region=131082, registered_commuter=True)])
    request.as_of.seconds = AS_OF_S
    return request


def code_of(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


def health_status(channel: grpc.Channel) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return int(reply.status)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, pki) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("tls")
    tokens = work / "tokens"
    digest = hashlib.sha256(ADMIN.encode()).hexdigest()
    tokens.write_text(
        f"# name role token\ngateway-a gateway {GATEWAY}\ningest-a   ingest  {INGEST}\n"
        f"ops        admin   sha256:{digest}\n",
        encoding="utf-8",
    )
    tokens.chmod(0o600)
    srv = ServerProcess(
        work,
        risk_csv=RISK_CSV,
        env={"HEALTHCODE_TOKENS": f"env-ops:admin:{ENV_ADMIN}"},
        extra_args=[*pki.server_args(), "--tokens-file", str(tokens)],
        name="tls",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, pki) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        tmp_path_factory.mktemp("mtls"),
        risk_csv=RISK_CSV,
        extra_args=[*pki.server_args(mutual=True), "--client-roles", "gw-1=gateway,ops-1=admin"],
        name="mtls",
    )
    yield srv
    srv.stop()


def stub_for(pki: Pki, srv: ServerProcess, token: str | None = None, client: str | None = None):  # type: ignore[no-untyped-def]
    channel = pki.channel(srv.address, client=client, token=token)
    return channel, pb_grpc.HealthCodeServiceStub(channel)


# ----------------------------------------------------------------------------------------------------------------
# TLS and tokens


def test_tls_works_and_health_needs_no_credentials(tls_server, pki):
    channel, stub = stub_for(pki, tls_server, token=GATEWAY)
    with channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        reply = stub.Evaluate(_evaluate_request(), timeout=10)
        assert len(reply.statuses) == 1 and reply.info.risk_list_version == 1
    with pki.channel(tls_server.address) as bare:  # TLS, no token: health still answers
        assert health_status(bare) == health_pb2.HealthCheckResponse.SERVING
    assert tls_server.metrics_url.startswith("https://")


def test_plaintext_client_against_tls_port_fails(tls_server):
    with grpc.insecure_channel(tls_server.address) as channel:
        code, _ = code_of(lambda: health_status(channel))
        assert code == grpc.StatusCode.UNAVAILABLE
        stub = pb_grpc.HealthCodeServiceStub(channel)
        code, _ = code_of(lambda: stub.Evaluate(_evaluate_request(), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE


def test_metrics_endpoint_speaks_https(tls_server, pki):
    context = ssl.create_default_context(cafile=pki.path("ca"))
    with urllib.request.urlopen(tls_server.metrics_url, timeout=10, context=context) as r:
        assert "healthcode_requests_total" in r.read().decode("utf-8")
    plain = tls_server.metrics_url.replace("https://", "http://")
    with pytest.raises(Exception):  # noqa: B017 - a reset connection or a bad status line, depending on timing
        urllib.request.urlopen(plain, timeout=10).read()


@pytest.mark.parametrize("token", [None, WRONG, ""], ids=["none", "wrong", "empty"])
def test_missing_or_unknown_token_is_unauthenticated(tls_server, pki, token):
    channel, stub = stub_for(pki, tls_server, token=token)
    with channel:
        code, message = code_of(lambda: stub.Evaluate(_evaluate_request(), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED, message
        code, _ = code_of(lambda: stub.PutRiskList(pb.PutRiskListRequest(csv=RISK_CSV), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED


def test_not_a_bearer_header_is_unauthenticated(tls_server, pki):
    with pki.channel(tls_server.address) as channel:
        stub = pb_grpc.HealthCodeServiceStub(channel)
        code, message = code_of(
            lambda: stub.Evaluate(_evaluate_request(), timeout=10, metadata=[("authorization", f"Basic {GATEWAY}")])
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer" in message


def test_gateway_may_not_replace_the_risk_list(tls_server, pki):
    channel, stub = stub_for(pki, tls_server, token=GATEWAY)
    with channel:
        code, message = code_of(lambda: stub.PutRiskList(pb.PutRiskListRequest(csv=RISK_CSV), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "gateway-a" in message and "PutRiskList" in message
        for call in (stub.PutPolicy, stub.Reevaluate):
            request = pb.PutPolicyRequest(toml="x") if call is stub.PutPolicy else pb.ReevaluateRequest()
            code, _ = code_of(lambda c=call, r=request: c(r, timeout=10))
            assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _ = code_of(lambda: stub.UpsertPersons(pb.UpsertPersonsRequest(), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).names  # reads are open to every role


def test_ingest_may_not_evaluate(tls_server, pki):
    channel, stub = stub_for(pki, tls_server, token=INGEST)
    with channel:
        code, message = code_of(lambda: stub.Evaluate(_evaluate_request(), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "ingest-a" in message and "Evaluate" in message
        code, _ = code_of(lambda: stub.EvaluateArrow(iter([pb.EvaluateArrowRequest()]), timeout=10).next())
        assert code == grpc.StatusCode.PERMISSION_DENIED
        # Its own RPCs pass the guard (this server has no store, so the servicer answers FAILED_PRECONDITION).
        code, _ = code_of(lambda: stub.UpsertPersons(pb.UpsertPersonsRequest(), timeout=10))
        assert code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("token", [ADMIN, ENV_ADMIN], ids=["file-digest", "environment"])
def test_admin_may_do_everything(tls_server, pki, token):
    channel, stub = stub_for(pki, tls_server, token=token)
    with channel:
        version = stub.PutRiskList(pb.PutRiskListRequest(csv=RISK_CSV), timeout=10).version
        assert version >= 2
        assert stub.Evaluate(_evaluate_request(), timeout=10).info.risk_list_version == version
        assert stub.GetRiskList(pb.GetRiskListRequest(), timeout=10).version == version


def test_reflection_is_open(tls_server, pki):
    with pki.channel(tls_server.address) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in response.list_services_response.service}
        assert "healthcode.v1.HealthCodeService" in names


def test_cli_call_with_tls_and_token_file(tls_server, pki, tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    from conftest import make_population

    population = tmp_path / "population.parquet"
    pq.write_table(make_population([{"person_id": 1}, {"person_id": 2}]), population)
    token_file = tmp_path / "token"
    token_file.write_text(GATEWAY + "\n", encoding="utf-8")
    out = tmp_path / "result.parquet"
    base = [*healthcode_cmd(), "call", "evaluate", str(population), "--target", tls_server.address, "--as-of",
            "2021-11-30T12:00:00+08:00", "--out", str(out), "--tls-ca", pki.path("ca")]  # fmt: skip
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("HEALTHCODE_")}
    done = subprocess.run([*base, "--token-file", str(token_file)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert pq.read_table(out).num_rows == 2
    # The token from the environment instead; without any token the server refuses.
    done = subprocess.run(base, capture_output=True, text=True, env={**env, "HEALTHCODE_TOKEN": GATEWAY}, timeout=60)
    assert done.returncode == 0, done.stderr
    done = subprocess.run(base, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0 and "UNAUTHENTICATED" in done.stderr
    assert GATEWAY not in done.stderr


def test_tls_server_logs_no_warning_and_never_a_token(tls_server, pki):
    # Run last in this module's tls_server group: every token above has been sent (and one refused).
    with token_channel(tls_server.address, None):
        pass
    log = tls_server.stderr() + tls_server.stdout()
    assert '"event": "rpc"' in log
    for secret in (GATEWAY, INGEST, ADMIN, ENV_ADMIN, WRONG, hashlib.sha256(ADMIN.encode()).hexdigest()):
        assert secret not in log
    assert "WITHOUT TLS" not in log and "NOT AUTHENTICATED" not in log
    assert '"token_principals": 4' in log


# ----------------------------------------------------------------------------------------------------------------
# Mutual TLS


def test_mtls_trusted_certificate_gets_its_role(mtls_server, pki):
    channel, stub = stub_for(pki, mtls_server, client="trusted")
    with channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        assert len(stub.Evaluate(_evaluate_request(), timeout=10).statuses) == 1
        code, message = code_of(lambda: stub.PutRiskList(pb.PutRiskListRequest(csv=RISK_CSV), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "gw-1" in message
    channel, stub = stub_for(pki, mtls_server, client="admin-cert")
    with channel:
        assert stub.PutRiskList(pb.PutRiskListRequest(csv=RISK_CSV), timeout=10).version == 2


def test_mtls_certificate_without_a_role_is_unauthenticated(mtls_server, pki):
    channel, stub = stub_for(pki, mtls_server, client="unknown-cert")
    with channel:
        code, message = code_of(lambda: stub.Evaluate(_evaluate_request(), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED, message


@pytest.mark.parametrize("client", ["untrusted", "expired", None], ids=["untrusted-ca", "expired", "no-cert"])
def test_mtls_refuses_bad_client_certificates(mtls_server, pki, client):
    channel, stub = stub_for(pki, mtls_server, client=client)
    with channel:
        code, _ = code_of(lambda: stub.Evaluate(_evaluate_request(), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE
        code, _ = code_of(lambda: health_status(channel))
        assert code == grpc.StatusCode.UNAVAILABLE
    assert mtls_server.proc.poll() is None


# ----------------------------------------------------------------------------------------------------------------
# Plaintext servers: reflection switch, warnings, bad settings


def test_reflection_can_be_switched_off(tmp_path):
    srv = ServerProcess(tmp_path, extra_args=["--no-reflection"], name="noreflect")
    try:
        with grpc.insecure_channel(srv.address) as channel:
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            code, _ = code_of(lambda: list(reflection.ServerReflectionInfo(iter([request]), timeout=10)))
            assert code == grpc.StatusCode.UNIMPLEMENTED
            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            # No auth configured: open, as before.
            assert len(pb_grpc.HealthCodeServiceStub(channel).Evaluate(_evaluate_request(), timeout=10).statuses) == 1
        assert "WITHOUT TLS" not in srv.stderr()  # loopback: no warning
    finally:
        srv.stop()


def test_non_loopback_plaintext_warns_loudly(tmp_path):
    srv = ServerProcess(tmp_path, extra_args=["--listen", "0.0.0.0:0"], name="public")
    try:
        warnings = [line for line in srv.stderr().splitlines() if " WARNING " in line]
        assert any("LISTENING WITHOUT TLS ON A NON-LOOPBACK ADDRESS 0.0.0.0:0" in line for line in warnings), warnings
        assert any("CALLERS ARE NOT AUTHENTICATED" in line for line in warnings), warnings
        port = srv.address.rpartition(":")[2]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.stop()


def _serve_error(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("HEALTHCODE_")}
    full_env.update(env or {})
    return subprocess.run(
        [*healthcode_cmd(), "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "", *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=full_env,
    )  # fmt: skip


def test_bad_security_settings_fail_at_start_up_without_quoting_tokens(tmp_path, pki):
    done = _serve_error(tmp_path, "--tls-cert", pki.path("server"))
    assert done.returncode == 2 and "tls_key" in done.stderr
    tokens = tmp_path / "tokens"
    tokens.write_text(f"gw gateway {GATEWAY}\nops superuser {ADMIN}\n", encoding="utf-8")
    done = _serve_error(tmp_path, "--tokens-file", str(tokens))
    assert done.returncode == 1  # a bad file is bad input; the settings of the wrong form around it exit 2
    assert "line 2" in done.stderr and "superuser" in done.stderr
    assert GATEWAY not in done.stderr and ADMIN not in done.stderr
    done = _serve_error(tmp_path, env={"HEALTHCODE_TOKENS": f"gw:gateway:{GATEWAY}:x!"})
    assert done.returncode == 2 and "HEALTHCODE_TOKENS: entry 1" in done.stderr and GATEWAY not in done.stderr
    done = _serve_error(tmp_path, "--client-roles", "gw-1=gateway")
    assert done.returncode == 2 and "tls_client_ca" in done.stderr


# ----------------------------------------------------------------------------------------------------------------
# The caller's identity, for the servicer (in process: a tiny server with the guard and one method)


def test_caller_identity_is_available_to_the_servicer():
    from healthcode.service import auth
    from healthcode.service.interceptors import ObservedService
    from healthcode.service.limits import Concurrency

    async def scenario() -> list[str]:
        seen: list[str] = []

        async def who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            seen.append(auth.caller(context))
            return auth.caller().encode()

        tokens = auth.parse_tokens(f"gateway-a gateway {GATEWAY}\n", "test")
        guard = auth.Guard(auth.Authenticator(tokens, {}), Concurrency(0, 0))
        server = grpc.aio.server()
        path = "/healthcode.v1.HealthCodeService/GetPolicy"  # ObservedService turns the guard's refusals into codes
        handler = guard.wrap_handler(path, grpc.unary_unary_rpc_method_handler(who))
        handler = ObservedService({}).wrap_handler(path, handler)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("healthcode.v1.HealthCodeService",
                                                                              {"GetPolicy": handler}),))  # fmt: skip
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/healthcode.v1.HealthCodeService/GetPolicy")
                got = await call(b"", metadata=[("authorization", f"Bearer {GATEWAY}")], timeout=10)
                seen.append(got.decode())
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(b"", timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(None)
        return seen

    assert asyncio.run(scenario()) == ["gateway-a", "gateway-a"]
