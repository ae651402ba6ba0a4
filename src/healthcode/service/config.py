"""Server settings: defaults, then a TOML file (``[server]`` table), then ``HEALTHCODE_*`` environment variables,
then command-line flags.  Every bad value names its source and key: a value of the wrong form (an instant without an
offset, a negative count) or settings that do not go together are a :class:`SettingError` (a usage error, exit 2);
a config file that cannot be read is a :class:`ConfigError` (bad input, exit 1)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import tomllib

from healthcode.errors import HealthcodeError, UsageError
from healthcode.rules.timebase import parse_given_instant
from healthcode.store import check_memory_limit


class ConfigError(HealthcodeError):
    """A setting is invalid: names the file or variable and the key."""


class SettingError(ConfigError, UsageError):
    """A setting's value is of the wrong form, or settings do not go together: names the flag, variable or key."""


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    metrics_listen: str = "127.0.0.1:9464"  # "" disables the Prometheus endpoint
    risk: str | None = None  # risk-list CSV loaded at start-up (None: an empty list, with a warning)
    policy: str | None = None  # policy TOML (None: the shipped default)
    max_message_bytes: int = 4 * 1024 * 1024  # per gRPC message, both directions
    workers: int = 4  # evaluation thread pool
    kernel_threads: int = 0  # threads per bulk evaluation (0: all cores)
    gateway_threads_rows: int = 50_000  # row-form batches up to this size run the kernel on one thread
    grace_seconds: float = 10.0  # how long SIGTERM waits for in-flight calls
    log_level: str = "info"
    demo_population: str | None = None  # a population file evaluated once at start-up (make serve)
    demo_as_of: str | None = None  # the instant the demo is evaluated at (None: now)
    reflection: bool = True
    store: str | None = None  # DuckDB store file: enables re-evaluation, change stream, GetStatus (issue 4)
    store_memory_limit: str = "2GB"  # DuckDB's buffer pool (the view lives outside it); past it DuckDB spills to disk
    store_threads: int = 0  # threads per DuckDB query (0: all cores)
    clock: str | None = None  # a fixed instant (ISO-8601) used instead of the wall clock: replaying history, tests
    # -- security (README "Security and limits") -------------------------------------------------------------------
    tls_cert: str | None = None  # PEM certificate chain of the server: with tls_key, the gRPC port speaks TLS only
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA bundle: clients must present a certificate it signed (mutual TLS)
    metrics_tls: bool = True  # with TLS configured, the metrics endpoint speaks HTTPS with the same certificate
    tokens_file: str | None = None  # bearer tokens, one "name role token" a line (also: $HEALTHCODE_TOKENS)
    client_roles: str | None = None  # mTLS identities: "CN-or-SAN=role[+role],..." (TOML: also a table)
    # -- limits ------------------------------------------------------------------------------------------------------
    max_request_rows: int = 1_000_000  # rows per request (row-form persons, one Arrow IPC message); 0: no limit
    max_concurrent_calls: int = 256  # healthcode calls in flight (streams included); 0: no limit
    max_concurrent_calls_per_caller: int = 0  # per principal (or per peer host when unauthenticated); 0: no limit
    shed_loop_lag_ms: int = 100  # shed data-plane calls while the event loop is this late (bulk: half); 0: never
    max_pending_calls: int = 64  # calls gRPC core may queue before the event loop takes them (then: CANCELLED)
    # A shedding front process owns the port and refuses calls past max_concurrent_calls with RESOURCE_EXHAUSTED
    # before they reach the event loop (docs/load.md): "on", "off", or "auto" (on for a non-loopback listen address)
    front: str = "auto"
    keepalive_time_ms: int = 60_000  # server pings an idle connection this often (0: never)
    keepalive_timeout_ms: int = 20_000  # and drops it when the ping is not answered in this time
    min_ping_interval_ms: int = 10_000  # clients may ping at most this often (grpc.http2.min_ping_interval...)
    max_connection_age_ms: int = 30 * 60_000  # connections are closed (GOAWAY) after this, so channels rebalance
    max_connection_age_grace_ms: int = 60_000  # calls still running then get this long to finish

    def now(self) -> int:
        """The server's clock (SPEC §2: read only when a request gives no as_of)."""
        import time

        return parse_given_instant(self.clock) if self.clock else int(time.time())


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


_AT_LEAST_ONE = ("max_message_bytes", "workers", "keepalive_timeout_ms")
#: Settings that hold an instant: refused at load without an offset, never read as local time or UTC later.
_INSTANTS = ("clock", "demo_as_of")


def _coerce(name: str, value: Any, where: str) -> Any:
    # A flag names itself ("--clock: ..."); a file or variable is followed by the key.
    label = where if where.startswith("--") else f"{where}: {name}"
    if name in _INSTANTS and value is not None:
        try:
            parse_given_instant(str(value))
        except ValueError as exc:
            raise SettingError(f"{label}: {exc}") from None
        return str(value)
    kind = _FIELDS[name].type
    if name == "client_roles" and isinstance(value, Mapping):
        value = ",".join(f"{k}={v}" for k, v in value.items())  # a TOML table: identity = "role"
    try:
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            v = int(value)
            if v < 0 or (name in _AT_LEAST_ONE and v < 1):
                raise ValueError
            return v
        if kind == "float":
            f = float(value)
            if f < 0:
                raise ValueError
            return f
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if value is None:
            return None
        return str(value)
    except (TypeError, ValueError):
        least = 1 if name in _AT_LEAST_ONE else 0
        wanted = {"int": f"a whole number >= {least}", "float": "a number >= 0", "bool": "true or false"}.get(
            str(kind), "a string"
        )
        raise SettingError(f"{label}: expected {wanted}, got {value!r}") from None


def load_settings(
    path: str | None = None, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        table = doc.get("server", {})
        unknown = sorted(set(doc) - {"server"}) + sorted(set(table) - set(_FIELDS))
        if unknown:
            raise SettingError(f"{path}: unknown key {unknown[0]!r} (known: [server] {', '.join(sorted(_FIELDS))})")
        values.update({k: _coerce(k, v, path) for k, v in table.items()})
    environ = os.environ if env is None else env
    for name in _FIELDS:
        var = "HEALTHCODE_" + name.upper()
        if var in environ:
            values[name] = _coerce(name, environ[var], var)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, "--" + name.replace("_", "-"))
    settings = Settings(**values)
    _check_security(settings)
    return settings


def _check_security(s: Settings) -> None:
    """Settings that only make sense together, and values of a form only their user knows."""
    try:
        check_memory_limit(s.store_memory_limit, "store_memory_limit")
    except HealthcodeError as exc:
        raise SettingError(str(exc)) from None
    if s.front not in ("auto", "on", "off"):
        raise SettingError(f"front: expected auto, on or off, got {s.front!r}")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise SettingError("tls_cert and tls_key: give both (the server certificate chain and its private key)")
    if s.tls_client_ca and not s.tls_cert:
        raise SettingError("tls_client_ca: mutual TLS needs TLS: give tls_cert and tls_key too")
    if s.client_roles and not s.tls_client_ca:
        raise SettingError("client_roles: certificate identities need mutual TLS: give tls_client_ca too")
