"""Starting and stopping the server as an operator meets it, against real ``healthcode serve`` processes: a busy
port is one line naming the address (no traceback, no gRPC log line), and SIGTERM is not held up by change-stream
subscribers that are only waiting for news."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow as pa
import pytest
from service_helpers import ServerProcess, healthcode_cmd

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc
from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.rules import engine
from healthcode.store import Store

AS_OF = 1638244800
CLOCK = "2021-11-30T12:00:00+08:00"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("HEALTHCODE_")}


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A local port something else listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*healthcode_cmd(), "serve", *args], capture_output=True, text=True, timeout=90, cwd=tmp_path, env=_env(),
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.parametrize("front", ["off", "on"])
def test_a_busy_grpc_port_is_one_line_naming_it(tmp_path, busy_port, front):
    started = time.monotonic()
    done = _serve(tmp_path, "--listen", f"127.0.0.1:{busy_port}", "--metrics-listen", "", "--front", front)
    assert done.returncode == 1 and done.stdout == ""
    # Exactly this, and before the store or the front is started: no traceback, no gRPC "E... add_port.cc" line.
    assert done.stderr == f"healthcode serve: error: cannot listen on 127.0.0.1:{busy_port}: address already in use\n"
    assert time.monotonic() - started < 30


def test_a_busy_metrics_port_is_one_line_naming_it(tmp_path, busy_port):
    done = _serve(tmp_path, "--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{busy_port}")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        f"healthcode serve: error: cannot listen on 127.0.0.1:{busy_port} (the metrics endpoint, metrics_listen): "
        "address already in use\n"
    )


@pytest.mark.parametrize("front", ["off", "on"])
def test_a_failure_once_serving_stops_everything_cleanly(tmp_path, front):
    """The demo population is read after the server (and its front) started: its failure must still end in one
    line, exit 1, with the gRPC server stopped on its event loop (no 'Event loop is closed', no 'never awaited')
    and the store released."""
    (tmp_path / "demo.parquet").write_bytes(b"not parquet at all")
    store = tmp_path / "store.duckdb"
    done = _serve(tmp_path, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--front", front,
                  "--store", str(store), "--demo-population", str(tmp_path / "demo.parquet"))  # fmt: skip
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "demo.parquet" in errors[0], done.stderr
    for noise in ("Traceback", "Event loop is closed", "never awaited", "Exception ignored"):
        assert noise not in done.stderr, done.stderr
    Store(str(store)).close()  # not left locked


# ----------------------------------------------------------------------------------------------------------------
# SIGTERM with change-stream subscribers waiting for news


@pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")
@pytest.mark.parametrize("front", ["off", "on"])
def test_sigterm_is_not_held_by_idle_change_stream_subscribers(tmp_path, front):
    path = tmp_path / "store.duckdb"
    with Store(path) as store:
        store.load_population(pa.Table.from_batches(list(generate_batches(2000, seed=5, as_of=AS_OF))))
    server = ServerProcess(
        tmp_path, risk_csv=generate_risk_csv(5, AS_OF), env={"HEALTHCODE_GRACE_SECONDS": "30"},
        extra_args=["--store", str(path), "--clock", CLOCK, "--front", front],
    )  # fmt: skip
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.HealthCodeServiceStub(channel)
            published = stub.Reevaluate(pb.ReevaluateRequest(), timeout=60).reevaluation
        assert published.high_water_mark > 0
        outcomes: dict[str, tuple[int, grpc.StatusCode | None, str]] = {}

        def subscribe(method: str) -> None:
            last = 0
            with grpc.insecure_channel(server.address) as channel:
                try:
                    call = getattr(pb_grpc.HealthCodeServiceStub(channel), method)
                    request = getattr(pb, f"{method}Request")(from_sequence=0)
                    for message in call(request, timeout=120):
                        last = message.changes[-1].sequence if method == "WatchChanges" else message.last_sequence
                    outcomes[method] = (last, grpc.StatusCode.OK, "")
                except grpc.RpcError as exc:
                    outcomes[method] = (last, exc.code(), exc.details() or "")

        threads = [threading.Thread(target=subscribe, args=(m,)) for m in ("WatchChanges", "WatchChangesArrow")]
        for thread in threads:
            thread.start()
        time.sleep(1.5)  # both have the change log by now and wait for the next change
        stopping = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=60)
        took = time.monotonic() - stopping
        for thread in threads:
            thread.join(timeout=30)
        assert code == 0, server.stderr()
        assert took < 8, f"SIGTERM took {took:.1f} s with a grace period of 30 s"
        for method in ("WatchChanges", "WatchChangesArrow"):
            last, status, details = outcomes[method]
            assert last == published.high_water_mark, method  # everything published was sent before the end
            assert status == grpc.StatusCode.UNAVAILABLE and "server shutting down" in details, outcomes[method]
        assert '"method": "WatchChanges", ' in server.stderr() and '"code": "UNAVAILABLE"' in server.stderr()
    finally:
        server.stop()
