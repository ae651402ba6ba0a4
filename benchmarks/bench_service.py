"""Service benchmarks (issue 3): client, healthcode server and the transport ceiling in separate processes.

* Bulk: EvaluateArrow rows/s and MB/s for 1M and 10M generated rows, against a raw-bytes echo of the same request
  bytes over the same gRPC stack (``echo_server.py``), as a ratio.
* Gateway: Evaluate with 100-person batches at concurrency 1, 8, 32 from a separate load-generator process (grpc.aio):
  RPC/s, p50/p99 latency; the same load against an empty-handler RPC on the same stack as the ceiling.
* Row form vs Arrow form: rows/s of Evaluate (batches of 1,000) and EvaluateArrow for the same 100k rows.

Figures are reported, never asserted: ``python benchmarks/bench_service.py`` (full, several minutes) or ``--quick``
(CI: small sizes, a few seconds per case).  The machine is shared and noisy: read the ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import grpc
import numpy as np
import pyarrow as pa

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc
from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.wire.ipc import ipc_chunks
from healthcode.wire.rows import batch_to_persons

AS_OF = 1638244800  # 2021-11-30T12:00:00+08:00
AS_OF_TEXT = "2021-11-30T12:00:00+08:00"
HERE = os.path.dirname(os.path.abspath(__file__))
MESSAGE_BYTES = 4 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MESSAGE_BYTES),
    ("grpc.max_send_message_length", MESSAGE_BYTES),
]


def _start(cmd: Sequence[str], marker: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(marker):
            return proc, line.split()[-1]
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not start")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


# -- bulk -----------------------------------------------------------------------------------------------------------


def _bulk_requests(table: pa.Table) -> list[bytes]:
    return [data for data, _rows in ipc_chunks(table, MESSAGE_BYTES - 4096)]


def _evaluate_arrow(channel: grpc.Channel, chunks: list[bytes]) -> tuple[float, int, int]:
    """One EvaluateArrow call on an open channel (a bulk client keeps its channel, as a gateway does)."""
    stub = pb_grpc.HealthCodeServiceStub(channel)

    def requests():  # type: ignore[no-untyped-def]
        options = pb.EvaluateOptions()
        options.as_of.seconds = AS_OF
        yield pb.EvaluateArrowRequest(options=options)
        for data in chunks:
            yield pb.EvaluateArrowRequest(arrow_ipc=data)

    started = time.perf_counter()
    rows = received = 0
    for response in stub.EvaluateArrow(requests(), timeout=600):
        rows += response.rows
        received += len(response.arrow_ipc)
    return time.perf_counter() - started, rows, received


def _echo(channel: grpc.Channel, chunks: list[bytes]) -> tuple[float, int]:
    call = channel.stream_stream("/bench.Echo/Stream", request_serializer=None, response_deserializer=None)
    started = time.perf_counter()
    received = sum(len(r) for r in call(iter(chunks), timeout=600))
    return time.perf_counter() - started, received


def bench_bulk(server: str, echo: str, sizes: Sequence[int], repeats: int) -> list[dict]:
    out = []
    for rows in sizes:
        table = pa.Table.from_batches(list(generate_batches(rows, seed=3)))
        chunks = _bulk_requests(table)
        sent = sum(len(c) for c in chunks)
        del table
        with (
            grpc.insecure_channel(server, options=CHANNEL_OPTIONS) as server_channel,
            grpc.insecure_channel(echo, options=CHANNEL_OPTIONS) as echo_channel,
        ):
            _evaluate_arrow(server_channel, chunks[:1])  # connect and warm up both channels
            _echo(echo_channel, chunks[:1])
            evals = [_evaluate_arrow(server_channel, chunks) for _ in range(repeats)]
            echoes = [_echo(echo_channel, chunks) for _ in range(repeats)]
        t_eval = float(np.median([e[0] for e in evals]))
        t_echo = float(np.median([e[0] for e in echoes]))
        assert all(e[1] == rows for e in evals), "EvaluateArrow returned a different row count"
        out.append(
            {
                "rows": rows,
                "request_MB": round(sent / 1e6, 1),
                "messages": len(chunks),
                "evaluate_arrow_s": round(t_eval, 3),
                "evaluate_arrow_rows_per_s": round(rows / t_eval),
                "evaluate_arrow_MB_per_s": round(sent / t_eval / 1e6, 1),
                "echo_s": round(t_echo, 3),
                "echo_MB_per_s": round(sent / t_echo / 1e6, 1),
                "ratio_to_ceiling": round(t_echo / t_eval, 3),
            }
        )
    return out


# -- gateway --------------------------------------------------------------------------------------------------------


async def _load(
    target: str, method: str, payloads: list[bytes], concurrency: int, seconds: float
) -> tuple[int, list[float]]:
    """Calls of ``method`` from ``concurrency`` workers for ``seconds``; each worker cycles through ``payloads``
    from its own starting point (different persons per call, as at a checkpoint, so no answer is a repeat)."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        await call(payloads[0], timeout=30)  # warm the channel
        stop_at = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            i = k * 7919
            while time.perf_counter() < stop_at:
                payload = payloads[i % len(payloads)]
                i += 1
                t0 = time.perf_counter()
                await call(payload, timeout=30)
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(latencies), [elapsed, *latencies]


def _load_process(args: tuple[str, str, list[bytes], int, float], queue: mp.Queue) -> None:
    count, data = asyncio.run(_load(*args))
    queue.put((count, data))


def _run_load(target: str, method: str, payloads: list[bytes], concurrency: int, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_load_process, args=((target, method, payloads, concurrency, seconds), queue))
    proc.start()
    count, data = queue.get(timeout=seconds + 120)
    proc.join()
    elapsed, latencies = data[0], np.array(data[1:])
    return {
        "rpc_per_s": round(count / elapsed, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2),
    }


def _evaluate_payloads(persons: int, count: int, seed: int) -> list[bytes]:
    """``count`` different Evaluate requests of ``persons`` generated persons each."""
    table = pa.Table.from_batches(list(generate_batches(persons * count, seed=seed)))
    out = []
    for start in range(0, persons * count, persons):
        request = pb.EvaluateRequest(persons=batch_to_persons(table.slice(start, persons)))
        request.as_of.seconds = AS_OF
        out.append(request.SerializeToString())
    return out


def _status_payloads(ids: np.ndarray, persons: int, count: int) -> list[bytes]:
    """``count`` GetStatus requests of ``persons`` stored ids each (ids drawn at random)."""
    rng = np.random.default_rng(11)
    out = []
    for _ in range(count):
        request = pb.GetStatusRequest(person_ids=rng.choice(ids, persons, replace=False).tolist())
        request.as_of.seconds = AS_OF
        out.append(request.SerializeToString())
    return out


EVALUATE = "/healthcode.v1.HealthCodeService/Evaluate"
GET_STATUS = "/healthcode.v1.HealthCodeService/GetStatus"
EMPTY = "/bench.Echo/Empty"


def bench_gateway(server: str, echo: str, concurrencies: Sequence[int], seconds: float) -> list[dict]:
    payloads = _evaluate_payloads(100, 50, seed=5)
    out = []
    for c in concurrencies:
        ev = _run_load(server, EVALUATE, payloads, c, seconds)
        empty = _run_load(echo, EMPTY, [b""], c, seconds)
        out.append(
            {
                "concurrency": c,
                "evaluate_100": ev,
                "empty_handler": empty,
                "ratio_to_ceiling": round(ev["rpc_per_s"] / empty["rpc_per_s"], 3),
            }
        )
    return out


def bench_checkpoint(server: str, echo: str, ids: np.ndarray, seconds: float, concurrency: int = 32) -> dict:
    """The checkpoint scan (issue 14): GetStatus of 1 and of 100 stored persons and Evaluate of 1 and of 100 at
    ``concurrency``, each against the empty handler on the same stack.  The empty handler runs before and after
    the four (their mean is the ceiling), so a machine that slows down during the run shows as a gap between
    them."""
    cases = {
        "evaluate_1": (EVALUATE, _evaluate_payloads(1, 2000, seed=21)),
        "evaluate_100": (EVALUATE, _evaluate_payloads(100, 50, seed=22)),
        "get_status_1": (GET_STATUS, _status_payloads(ids, 1, 2000)),
        "get_status_100": (GET_STATUS, _status_payloads(ids, 100, 200)),
    }
    before = _run_load(echo, EMPTY, [b""], concurrency, seconds)
    figures = {name: _run_load(server, method, payloads, concurrency, seconds) for name, (method, payloads) in
               cases.items()}  # fmt: skip
    after = _run_load(echo, EMPTY, [b""], concurrency, seconds)
    ceiling = (before["rpc_per_s"] + after["rpc_per_s"]) / 2
    rate = {name: f["rpc_per_s"] for name, f in figures.items()}
    return {
        "concurrency": concurrency,
        "stored_persons": len(ids),
        "empty_handler_before": before,
        "empty_handler_after": after,
        **figures,
        "ratios": {
            "get_status_1_to_empty": round(rate["get_status_1"] / ceiling, 3),
            "get_status_100_to_evaluate_100": round(rate["get_status_100"] / rate["evaluate_100"], 3),
            "evaluate_1_to_empty": round(rate["evaluate_1"] / ceiling, 3),
            "evaluate_100_to_empty": round(rate["evaluate_100"] / ceiling, 3),
        },
        "targets": {
            "get_status_1_to_empty": ">= 0.6",
            "get_status_100_to_evaluate_100": ">= 1.0",
            "evaluate_1_to_empty": ">= 0.6",
            "evaluate_100_to_empty": ">= 0.6",
        },
    }


# -- row form vs Arrow form -----------------------------------------------------------------------------------------


def bench_forms(server: str, rows: int, batch_sizes: Sequence[int] = (100, 1000)) -> dict:
    """Rows/s of Evaluate (sequential calls of each batch size) and of EvaluateArrow for the same rows, on one
    channel each; 100 is the gateway benchmark's batch, 1,000 the row form at its most favourable."""
    table = pa.Table.from_batches(list(generate_batches(rows, seed=7)))
    chunks = _bulk_requests(table)
    out: dict = {"rows": rows}
    with grpc.insecure_channel(server, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.HealthCodeServiceStub(channel)
        t_arrow = float(np.median([_evaluate_arrow(channel, chunks)[0] for _ in range(5)]))
        out["arrow_form_rows_per_s"] = round(rows / t_arrow)
        for size in batch_sizes:
            requests = []
            for start in range(0, rows, size):
                r = pb.EvaluateRequest(persons=batch_to_persons(table.slice(start, size)))
                r.as_of.seconds = AS_OF
                requests.append(r)
            stub.Evaluate(requests[0], timeout=60)  # warm up
            started = time.perf_counter()
            for r in requests:
                stub.Evaluate(r, timeout=60)
            t_rows = time.perf_counter() - started
            out[f"row_form_{size}_rows_per_s"] = round(rows / t_rows)
            out[f"arrow_over_row_{size}"] = round(t_rows / t_arrow, 1)
    return out


SECTIONS = ("bulk", "gateway", "checkpoint", "forms")


def _stored(tmp: str, rows: int) -> tuple[str, np.ndarray]:
    """A store of ``rows`` generated persons (``healthcode generate`` then ``healthcode load``) and their ids."""
    import pyarrow.parquet as pq

    bin_dir = os.path.dirname(sys.executable)
    data = os.path.join(tmp, "stored")
    store = os.path.join(tmp, "store.duckdb")
    subprocess.run([os.path.join(bin_dir, "healthcode"), "generate", data, "--rows", str(rows), "--seed", "9",
                    "--no-progress"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    population = os.path.join(data, "population.parquet")
    subprocess.run([os.path.join(bin_dir, "healthcode"), "load", population, "--store", store, "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ids = pq.read_table(population, columns=["person_id"]).column("person_id").drop_null().to_numpy()
    return store, np.unique(ids)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for CI (seconds, not minutes)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    parser.add_argument("--seconds", type=float, help="seconds per gateway case (default 5, --quick 1)")
    parser.add_argument("--stored-rows", type=int, help="persons in the checkpoint section's store (default 1M)")
    args = parser.parse_args(argv)
    sizes = [200_000] if args.quick else [1_000_000, 10_000_000]
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    concurrencies = [1, 8, 32]
    form_rows = 20_000 if args.quick else 100_000
    repeats = 1 if args.quick else 3
    stored_rows = args.stored_rows or (20_000 if args.quick else 1_000_000)
    sections = args.only or SECTIONS

    with tempfile.TemporaryDirectory() as tmp:
        risk = os.path.join(tmp, "risk.csv")
        with open(risk, "w") as f:
            f.write(generate_risk_csv(1, AS_OF))
        store, ids = _stored(tmp, stored_rows) if "checkpoint" in sections else ("", np.zeros(0, np.uint64))
        bin_dir = os.path.dirname(sys.executable)
        server, target = _start(
            [os.path.join(bin_dir, "healthcode"), "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "",
             "--risk", risk, *(["--store", store, "--clock", AS_OF_TEXT] if store else [])],
            "healthcode serving on",
        )  # fmt: skip
        echo, echo_target = _start([sys.executable, os.path.join(HERE, "echo_server.py")], "echo serving on")
        report: dict = {"grpcio": grpc.__version__}
        try:
            if "bulk" in sections:
                report["bulk"] = bench_bulk(target, echo_target, sizes, repeats)
            if "gateway" in sections:
                report["gateway"] = bench_gateway(target, echo_target, concurrencies, seconds)
            if "checkpoint" in sections:
                report["checkpoint"] = bench_checkpoint(target, echo_target, ids, seconds)
            if "forms" in sections:
                report["forms"] = bench_forms(target, form_rows)
        finally:
            _stop(server)
            _stop(echo)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
