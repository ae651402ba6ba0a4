"""The listening port's transport settings, shared by the server and its front: gRPC channel options and TLS
credentials."""

from __future__ import annotations

import errno
import socket

import grpc

from healthcode.service.config import ConfigError, Settings


def is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def grpc_options(settings: Settings, public: bool = True) -> list[tuple[str, int]]:
    """Channel options of a listening port; ``public=False``: the server's private socket behind the front, which
    needs no connection-age rotation (the front is its only, long-lived, caller)."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not silently share the traffic
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", settings.min_ping_interval_ms),
        # Idle gateway channels may keep their connection alive with pings (at most every min_ping_interval_ms)
        # without being sent GOAWAY "too_many_pings".
        ("grpc.keepalive_permit_without_calls", 1),
        # A bounded queue in front of the event loop: past it gRPC core refuses new calls at once (CANCELLED), so an
        # admitted call never waits behind an unbounded backlog and memory stays bounded.
        ("grpc.server.max_pending_requests", settings.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", 2 * settings.max_pending_calls),
    ]
    if settings.keepalive_time_ms:
        options.append(("grpc.keepalive_time_ms", settings.keepalive_time_ms))
    if settings.max_connection_age_ms and public:
        options.append(("grpc.max_connection_age_ms", settings.max_connection_age_ms))  # channels rebalance
        options.append(("grpc.max_connection_age_grace_ms", settings.max_connection_age_grace_ms))
    return options


def _read_pem(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{key}: {path}: cannot read: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{key}: {path}: not a PEM file")
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials of the gRPC port (None: plaintext); with tls_client_ca, client certificates are required
    and checked against it (mutual TLS)."""
    if not settings.tls_cert or not settings.tls_key:
        return None
    pair = (_read_pem(settings.tls_key, "tls_key"), _read_pem(settings.tls_cert, "tls_cert"))
    ca = _read_pem(settings.tls_client_ca, "tls_client_ca") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def check_free(address: str, what: str = "") -> None:
    """Raise OSError (one line naming ``address`` and ``what`` listens there) if ``host:port`` is taken or may not
    be bound by this user, found by binding a plain socket to it first: gRPC would print its own error line and
    a hint about GRPC_VERBOSITY instead.  Port 0 (any free port) and Unix sockets are not checked."""
    host, _, port = address.rpartition(":")
    if address.startswith("unix:") or not port.isdigit() or int(port) == 0:
        return
    try:
        found = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {address}{what}: {exc.strerror or exc}") from None
    refused: list[int] = []
    for family, kind, proto, _, sockaddr in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no obstacle
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                refused.append(exc.errno or 0)
                continue
        return  # gRPC listens when it can bind one of the addresses
    for code, words in ((errno.EADDRINUSE, "address already in use"), (errno.EACCES, "permission denied")):
        if code in refused:
            raise OSError(f"cannot listen on {address}{what}: {words}")
    # Anything else (e.g. no IPv6 for [::]) is left to gRPC, which may fall back to another address.


def listen(server: grpc.Server | grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Add the listening port to ``server`` (TLS with ``credentials``, plaintext without); returns the bound port.
    Raises OSError saying which address could not be bound."""
    check_free(address)
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:  # gRPC's message only says to set GRPC_VERBOSITY=debug
        raise OSError(f"cannot listen on {address}: gRPC could not bind it (a bad host, or the port taken)") from None
