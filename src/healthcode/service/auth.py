"""Caller authentication and authorization, and the per-call guard (auth, limits, deadline) of the healthcode RPCs.

Callers prove who they are with a bearer token (metadata ``authorization: Bearer <token>``) or, under mutual TLS,
with their client certificate (its subject CN or a SAN).  Each known caller has a principal name and roles:

========  =====================================================================================================
role      may call
========  =====================================================================================================
gateway   Evaluate, EvaluateArrow, GetStatus, WatchChanges (and the reads GetRiskList, GetPolicy)
ingest    UpsertPersons, RecordNatResults, RecordEntries, RecordVisits (row and Arrow forms) (and the reads)
admin     PutRiskList, PutPolicy, Reevaluate, and everything else
========  =====================================================================================================

Missing or unknown credentials: UNAUTHENTICATED; a known caller without the role: PERMISSION_DENIED.  Tokens are
kept as SHA-256 digests and compared with :func:`hmac.compare_digest`; they are never logged, and errors about the
token file name the line, never its content.  With no tokens and no certificate roles configured, every caller is
let in (as today) under the name ``anonymous`` (or the certificate CN under mutual TLS).

The servicer reads who is calling with :func:`caller` (a context variable set for the duration of the call).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from healthcode.errors import Expired, HealthcodeError, PermissionDenied, Unauthenticated
from healthcode.service.config import ConfigError, SettingError, Settings
from healthcode.service.front import CLIENT_NAME, FIRST_MESSAGE_SECONDS, PEER
from healthcode.service.interceptors import ServiceInterceptor
from healthcode.service.limits import CONTROL_METHODS, Concurrency, Overload
from healthcode.service.status import Cancelled
from healthcode.wire.limits import check_rows

log = logging.getLogger("healthcode.service.auth")

ROLES = ("gateway", "ingest", "admin")
#: Methods each role may call (admin may call every method).
READS = frozenset({"GetRiskList", "GetPolicy"})
ROLE_METHODS: dict[str, frozenset[str]] = {
    "gateway": frozenset({"Evaluate", "EvaluateArrow", "GetStatus", "WatchChanges", "WatchChangesArrow"}) | READS,
    "ingest": frozenset({"UpsertPersons", "RecordNatResults", "RecordEntries", "RecordVisits"}) | READS,
    "admin": frozenset(),  # everything: see allowed()
}
#: Environment variable holding tokens as ``name:role:token`` entries separated by commas or newlines.
TOKENS_ENV = "HEALTHCODE_TOKENS"
ANONYMOUS = "anonymous"

_TOKEN68 = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
_NAME = re.compile(r"^[A-Za-z0-9._@:\-]+$")
_DIGEST = re.compile(r"^sha256:([0-9a-fA-F]{64})$")

#: The principal of the call being served (see :func:`caller`).
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default=ANONYMOUS)
_BY_CONTEXT: dict[int, str] = {}


def caller(context: Any = None) -> str:
    """The principal name of the caller of the current RPC: the token's name, the client certificate's identity
    under mutual TLS, or ``"anonymous"`` on a server without authentication.  Never a token.

    Call it from the servicer (on the event loop: ``run_in_executor`` threads do not inherit the context variable;
    passing ``context`` works from anywhere while the call runs)."""
    if context is not None:
        found = _BY_CONTEXT.get(id(context))
        if found is not None:
            return found
    return CALLER.get()


def allowed(roles: frozenset[str], method: str) -> bool:
    return "admin" in roles or any(method in ROLE_METHODS.get(r, frozenset()) for r in roles)


@dataclass(frozen=True)
class Principal:
    name: str
    roles: frozenset[str]


def _roles(text: str, where: str) -> frozenset[str]:
    roles = frozenset(r.strip() for r in text.split("+") if r.strip())
    unknown = sorted(roles - set(ROLES))
    if not roles or unknown:
        bad = unknown[0] if unknown else text
        raise ConfigError(f"{where}: unknown role {bad!r}; the roles are {', '.join(ROLES)}")
    return roles


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii", "replace")).digest()


class Authenticator:
    """Known callers: token digests and certificate identities, each with a principal name and roles."""

    def __init__(self, tokens: Sequence[tuple[bytes, Principal]], identities: Mapping[str, Principal]) -> None:
        self.tokens = list(tokens)
        self.identities = dict(identities)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.identities)

    def by_token(self, token: str) -> Principal | None:
        """The principal holding ``token``: every digest is compared (in constant time), so timing does not tell
        how much of a token was right nor which entry matched."""
        presented = _digest(token)
        found = None
        for digest, principal in self.tokens:
            if hmac.compare_digest(presented, digest):
                found = principal
        return found

    def by_certificate(self, names: Sequence[str]) -> Principal | None:
        for name in names:
            if name in self.identities:
                return self.identities[name]
        return None


def parse_tokens(text: str, where: str, *, env_form: bool = False) -> list[tuple[bytes, Principal]]:
    """Token entries: ``name role token`` a line (``#`` comments; ``env_form``: ``name:role:token`` separated by
    commas or newlines).  ``token`` may be given as ``sha256:<64 hex digits>`` (its digest) instead.  Error
    messages name the entry number, never its content."""
    out: list[tuple[bytes, Principal]] = []
    entries = re.split(r"[,\n]", text) if env_form else text.splitlines()
    for number, raw in enumerate(entries, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        label = f"{where}: entry {number}" if env_form else f"{where}: line {number}"
        parts = line.split(":", 2) if env_form else line.split()
        if len(parts) != 3:
            shape = "name:role:token" if env_form else "name role token"
            raise ConfigError(f"{label}: expected {shape}")
        name, role, token = parts
        if not _NAME.match(name):
            raise ConfigError(f"{label}: the name may hold letters, digits and . _ @ : - only")
        roles = _roles(role, label)
        digest = _DIGEST.match(token)
        if digest:
            value = bytes.fromhex(digest.group(1))
        elif _TOKEN68.match(token):
            if len(token) < 16:
                log.warning("%s: the token of %s is shorter than 16 characters: easy to guess", label, name)
            value = _digest(token)
        else:
            raise ConfigError(f"{label}: the token must be a bearer token (letters, digits, -._~+/ and = at the end)")
        out.append((value, Principal(name, roles)))
    return out


def parse_identities(text: str, where: str = "client_roles") -> dict[str, Principal]:
    """``identity=role[+role],...``: certificate identities (subject CN or SAN) and their roles."""
    out: dict[str, Principal] = {}
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, role = entry.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"{where}: expected identity=role, got {entry!r}")
        out[name] = Principal(name, _roles(role, f"{where}: {name}"))
    return out


def load_authenticator(settings: Settings, environ: Mapping[str, str] | None = None) -> Authenticator:
    """The callers known to the server: ``tokens_file``, ``$HEALTHCODE_TOKENS`` and ``client_roles``."""
    environ = os.environ if environ is None else environ
    tokens: list[tuple[bytes, Principal]] = []
    if settings.tokens_file:
        path = settings.tokens_file
        try:
            with open(path, encoding="utf-8") as f:
                mode = os.fstat(f.fileno()).st_mode
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the tokens file: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: the tokens file is not UTF-8 text") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s: the tokens file can be read by other users: chmod 600 it", path)
        tokens += parse_tokens(text, path)
    try:
        if environ.get(TOKENS_ENV):
            tokens += parse_tokens(environ[TOKENS_ENV], TOKENS_ENV, env_form=True)
        identities = parse_identities(settings.client_roles) if settings.client_roles else {}
    except ConfigError as exc:  # a variable or a setting of the wrong form, not a file: a usage error
        raise SettingError(str(exc)) from None
    return Authenticator(tokens, identities)


# ---------------------------------------------------------------------------------------------------------------
# The guard interceptor


def _bearer(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The bearer token of the call's metadata ("" when the header is there but not a bearer token)."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def _certificate_names(context: grpc.aio.ServicerContext, forwarded: bool = False) -> list[str]:
    if forwarded:  # behind the front, which verified the certificate and passes its names on
        return [str(v) for k, v in context.invocation_metadata() or () if k == CLIENT_NAME]
    auth = context.auth_context() or {}
    names = [v.decode("utf-8", "replace") for v in auth.get("x509_common_name", ())]
    names += [v.decode("utf-8", "replace") for v in auth.get("x509_subject_alternative_name", ())]
    return names


def _peer_host(context: grpc.aio.ServicerContext, forwarded: bool = False) -> str:
    peer = context.peer() or ""
    if forwarded:
        peer = next((str(v) for k, v in context.invocation_metadata() or () if k == PEER), peer)
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]")
    return peer


#: Row-form requests whose row count is checked when they arrive (the Arrow forms are checked in wire.read_stream).
_ROW_FIELDS = {
    "UpsertPersons": "persons",
    "RecordNatResults": "results",
    "RecordEntries": "entries",
    "RecordVisits": "visits",
}  # (Evaluate and GetStatus count theirs as their codec reads them)


class Guard(ServiceInterceptor):
    """Runs before every healthcode RPC (health and reflection are left alone, so they are never refused):
    authenticates and authorizes the caller, refuses a call whose deadline already passed, checks the row count
    of row-form requests, and takes a concurrency slot for the length of the call.  Refusals abort the call with
    their error (of :mod:`healthcode.errors`), which :class:`~healthcode.service.interceptors.ObservedService`
    (outside it) turns into the status code, logs and counts."""

    def __init__(
        self,
        authenticator: Authenticator,
        concurrency: Concurrency,
        *,
        client_certificates: bool = True,
        overload: Overload | None = None,
        forwarded: bool = False,
    ) -> None:
        self.auth = authenticator
        self.concurrency = concurrency
        self.overload = overload
        self.certificates = client_certificates  # False: no mutual TLS, no certificate to look at
        # True: every call comes through the front (service.front) on a private socket, so the certificate names
        # and the peer are read from the metadata the front sets (it drops what callers send under those keys)
        self.forwarded = forwarded

    def identify(self, method: str, context: grpc.aio.ServicerContext) -> str:
        """The caller's principal name; raises :class:`Unauthenticated` or :class:`PermissionDenied`."""
        if not self.auth.enabled:
            names = _certificate_names(context, self.forwarded) if self.certificates else []
            return names[0] if names else ANONYMOUS
        token = _bearer(context.invocation_metadata())
        principal = None
        if token:
            principal = self.auth.by_token(token)
            if principal is None:
                raise Unauthenticated("unknown bearer token")
        elif token == "":
            raise Unauthenticated("the authorization header must be 'Bearer <token>'")
        else:
            names = _certificate_names(context, self.forwarded) if self.certificates else []
            principal = self.auth.by_certificate(names)
            if principal is None:
                raise Unauthenticated(
                    "unknown client certificate identity" if names else
                    "no credentials: send 'authorization: Bearer <token>' metadata or a client certificate",
                )  # fmt: skip
        if not allowed(principal.roles, method):
            roles = "+".join(sorted(principal.roles))
            raise PermissionDenied(f"{principal.name} ({roles}) may not call {method}")
        return principal.name

    def _enter(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> str:
        name = self.identify(method, context)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise Expired("the deadline passed before the call started")
        if self.overload is not None:
            self.overload.check(method)
        rows = getattr(request, _ROW_FIELDS.get(method, ""), None)
        if rows is not None:
            check_rows(len(rows), f"{method}: {_ROW_FIELDS[method]}")
        key = name if self.auth.enabled else f"{name}@{_peer_host(context, self.forwarded)}"
        self.concurrency.acquire(key, method in CONTROL_METHODS)
        _BY_CONTEXT[id(context)] = name
        return key

    async def _admit(self, method: str, request: Any, context: grpc.aio.ServicerContext, requests: Any = None) -> str:
        """:meth:`_enter`; a refusal is raised on to :class:`~healthcode.service.interceptors.ObservedService`,
        which ends the call with its code (and logs and counts it).

        A call that streams its ``requests`` is refused once its first request has arrived (waiting at most
        :data:`FIRST_MESSAGE_SECONDS`): a grpc.aio client still writing its first request when the call ends reads
        INTERNAL "Internal error from Core" instead of the refusal (grpc/grpc#36066), while one that waits for the
        first answer before sending more (as ours do) reads the real code."""
        try:
            return self._enter(method, request, context)
        except HealthcodeError as exc:
            refusal = exc
        if requests is not None:
            with contextlib.suppress(Exception):  # the end of the stream, a cancellation, the wait running out
                await asyncio.wait_for(anext(aiter(requests)), FIRST_MESSAGE_SECONDS)
        raise refusal

    def _leave(self, key: str, context: grpc.aio.ServicerContext) -> None:
        _BY_CONTEXT.pop(id(context), None)
        self.concurrency.release(key)

    def wrap_unary(self, method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            key = await self._admit(method, request, context)
            reset = CALLER.set(_BY_CONTEXT[id(context)])
            try:
                return await behavior(request, context)
            finally:
                CALLER.reset(reset)
                self._leave(key, context)

        return handler

    def wrap_stream(
        self, method: str, behavior: Callable[..., AsyncIterator[Any]], streaming_request: bool
    ) -> Callable[..., AsyncIterator[Any]]:
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if streaming_request:
                key = await self._admit(method, None, context, requests=request)
            else:
                key = await self._admit(method, request, context)
            released: list[bool] = []

            def leave(_: Any = None) -> None:
                if not released:  # once: when the generator ends or when the RPC is over, whichever comes first
                    released.append(True)
                    self._leave(key, context)

            context.add_done_callback(leave)
            CALLER.set(_BY_CONTEXT[id(context)])
            try:
                source = _checked(request, context) if streaming_request else request
                async for response in behavior(source, context):
                    yield response
            finally:
                leave()

        return handler


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """A request stream that ends the call instead of handing over a request once the deadline passed or the
    client cancelled: no new kernel work starts for an abandoned call."""
    async for request in requests:
        if context.cancelled():
            raise Cancelled("the call was cancelled")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise Expired("the deadline passed while requests were arriving")
        yield request
    # The stream ended: a client's half-close, or its cancellation (grpc.aio ends the request stream the same way
    # for both, and tells the call only when its close notice is handled).  Let the loop handle a notice that came
    # with the end of the stream, so a cancelled call ends CANCELLED instead of finishing as if it were complete.
    await asyncio.sleep(0)
    await asyncio.sleep(0)
