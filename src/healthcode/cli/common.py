"""What the subcommands share: the error a command exits with, progress bars, reading a population file, the
parsing of instants and thread counts, the options of a connection to a server and the client they give (a server's
error as one line), the summary line of a re-evaluation, and the metadata a result file carries."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from healthcode.client import Client

EXIT_USAGE = 2
EXIT_FAILED = 1


class CliError(Exception):
    """A message for the user; the command exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def progress_bar(total: int, enabled: bool | None, unit: str = "rows"):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    # Shown on a terminal for large inputs unless forced either way with --progress/--no-progress.
    disable = (not enabled) if enabled is not None else (total < 500_000 or not sys.stderr.isatty())
    return tqdm(total=total, unit=unit, unit_scale=True, disable=disable, file=sys.stderr, leave=False)


@contextmanager
def population_reader(path: str, batch_rows: int) -> Iterator[tuple[pa.Schema, int, Iterator[pa.RecordBatch]]]:
    """Open a Parquet or Arrow IPC population file: its schema, row count and a stream of batches."""
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    if path.endswith((".arrow", ".feather", ".ipc")):
        try:
            reader = pa.ipc.open_file(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise CliError(f"{path}: not an Arrow IPC file: {exc}") from None
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        yield (
            reader.schema,
            sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches)),
            batches,
        )
        return
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CliError(f"{path}: not a Parquet file ({exc}); give a .parquet or an Arrow IPC .arrow file") from None
    with pf:
        yield pf.schema_arrow, pf.metadata.num_rows, pf.iter_batches(batch_size=batch_rows)


def server_channel(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The channel to --target with the connection options (TLS, client certificate, bearer token)."""
    from healthcode.client.client import DEFAULT_MESSAGE_BYTES, make_channel, read_token

    if bool(args.tls_cert) != bool(args.tls_key):
        raise CliError("--tls-cert and --tls-key go together (the client certificate and its key)", EXIT_USAGE)
    try:
        token = read_token(args.token_file)
        return make_channel(
            args.target, max_message_bytes=DEFAULT_MESSAGE_BYTES, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
            tls_key=args.tls_key, tls=True if args.tls else None, server_name=args.server_name, token=token,
        )  # fmt: skip
    except OSError as exc:  # a certificate or key file that cannot be read: bad input
        raise CliError(f"{exc.filename}: cannot read: {exc.strerror or exc}" if exc.filename else str(exc)) from None
    except ValueError as exc:  # the token file
        raise CliError(str(exc)) from None


@contextmanager
def server_client(args: argparse.Namespace, about: str | None = None) -> Iterator[Client]:
    """A client of ``args.target`` with the connection options and ``args.timeout`` (none without one: a stream
    that lasts as long as it is left to); a server's error becomes one line "HOST:PORT: CODE: details" (after
    ``about``, e.g. the file whose rows were refused)."""
    import grpc

    from healthcode.client import Client

    client = Client(args.target, timeout=getattr(args, "timeout", None), channel=server_channel(args))
    try:
        with client:
            yield client
    except grpc.RpcError as exc:
        where = f"{about}: " if about else ""
        raise CliError(f"{where}{args.target}: {exc.code().name}: {exc.details()}") from None


class ReevaluationCounts(Protocol):
    """What a re-evaluation did (the client's ``Reevaluation``, the live layer's summary)."""

    @property
    def evaluated(self) -> int: ...
    @property
    def changed(self) -> int: ...
    @property
    def badges_lost(self) -> int: ...
    @property
    def badges_gained(self) -> int: ...
    @property
    def entries_lost(self) -> int: ...
    @property
    def entries_gained(self) -> int: ...
    @property
    def high_water_mark(self) -> int: ...


def reevaluation_line(s: ReevaluationCounts, seconds: float) -> str:
    """The one-line summary of a re-evaluation (``healthcode reevaluate``, ``healthcode call reevaluate``)."""
    return (
        f"{s.evaluated:,} persons re-evaluated, {s.changed:,} changed (badges -{s.badges_lost:,} "
        f"+{s.badges_gained:,}, entries -{s.entries_lost:,} +{s.entries_gained:,}); change log at "
        f"{s.high_water_mark:,} in {seconds:.2f} s"
    )


def parse_instant(text: str, option: str = "--as-of") -> int:
    """The instant given to ``option``: ISO-8601 with an offset, or a usage error naming the option."""
    from healthcode.rules.timebase import parse_given_instant

    try:
        return parse_given_instant(text)
    except ValueError as exc:
        raise CliError(f"{option}: {exc}", EXIT_USAGE) from None


def result_metadata(as_of: int, policy: str, risk_list_version: int) -> dict[bytes, bytes]:
    """The key-value metadata of a result Parquet file: what it was evaluated at and under (``as_of`` as ISO-8601
    Beijing time, the policy's name, the risk list's version, 0 for a list read from a file) and by which version
    of healthcode."""
    from healthcode import __version__
    from healthcode.rules.timebase import to_datetime

    return {
        b"healthcode.as_of": to_datetime(as_of).isoformat().encode(),
        b"healthcode.policy": policy.encode(),
        b"healthcode.risk_list_version": str(risk_list_version).encode(),
        b"healthcode.version": __version__.encode(),
    }


def thread_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def progress_options() -> argparse.ArgumentParser:
    """The ``--progress`` option, as a parent parser."""
    progress = argparse.ArgumentParser(add_help=False)
    progress.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="show a progress bar (default: on a terminal, for large inputs)",
    )  # fmt: skip
    return progress


def connection_options() -> argparse.ArgumentParser:
    """The options of a connection to a (secured) server, as a parent parser."""
    connection = argparse.ArgumentParser(add_help=False)
    conn = connection.add_argument_group("connection (a secured server; see README 'Security and limits')")
    conn.add_argument("--tls", action="store_true", help="use TLS, checking the server against the system CAs")
    conn.add_argument("--tls-ca", help="use TLS, checking the server's certificate against this CA bundle (PEM)")
    conn.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS; with --tls-key")
    conn.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
    conn.add_argument("--server-name", help="the name to check the server's certificate for (default: the host)")
    conn.add_argument(
        "--token-file", help="file holding a bearer token (default: $HEALTHCODE_TOKEN, when set)"
    )  # fmt: skip
    return connection
