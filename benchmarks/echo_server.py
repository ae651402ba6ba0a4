"""The transport ceiling: a grpc.aio server on the same stack and options as healthcode's, doing no work.

``/bench.Echo/Stream`` echoes raw bytes back (the bulk ceiling); ``/bench.Echo/Empty`` answers an empty message at
once (the gateway ceiling).  Run: ``python benchmarks/echo_server.py --listen 127.0.0.1:0``; it prints its address.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

from healthcode.service.config import Settings
from healthcode.service.transport import grpc_options


def _identity(b: bytes) -> bytes:
    return b


async def _stream(request_iterator, context):  # type: ignore[no-untyped-def]
    async for chunk in request_iterator:
        yield chunk


async def _empty(request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
    return b""


async def main(listen: str, max_message_bytes: int) -> None:
    server = grpc.aio.server(options=grpc_options(Settings(max_message_bytes=max_message_bytes)))
    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(_stream, _identity, _identity),
        "Empty": grpc.unary_unary_rpc_method_handler(_empty, _identity, _identity),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", handlers),))
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"echo serving on {listen.rpartition(':')[0]}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024)
    args = parser.parse_args()
    asyncio.run(main(args.listen, args.max_message_bytes))
