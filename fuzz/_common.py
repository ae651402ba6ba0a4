"""Shared by the fuzz harnesses and tests/test_fuzz*.py: the server's own call sequences, and the accepted outcomes.

Every harness exposes ``check(data: bytes) -> None``: it feeds ``data`` through the same calls the server makes on
request bytes and returns normally when the outcome is acceptable (success, or a deliberate
:class:`HealthcodeError` of the one hierarchy, with a non-empty message).  Anything else propagates, and the
fuzzer (or the corpus replay test) reports it as a crash.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyarrow as pa

from healthcode.errors import HealthcodeError
from healthcode.live.control import Control
from healthcode.live.state import State
from healthcode.rules.policy import default_policy
from healthcode.rules.regions import parse_risk_csv
from healthcode.service.config import Settings
from healthcode.service.servicer import HealthCodeService

FUZZ_DIR = Path(__file__).resolve().parent
CORPUS_DIR = FUZZ_DIR / "corpus"
CRASHES_DIR = FUZZ_DIR / "crashes"

#: 2021-11-30T12:00:00+08:00, the SPEC's worked-example instant.
AS_OF = 1638244800
AS_OF_TEXT = "2021-11-30T12:00:00+08:00"

#: A small risk list: county, prefecture and province entries, bounded and open intervals, both kinds.
RISK_CSV = (
    "region,start_date,end_date,kind\n"
    "130102,2021-11-25,,local_case\n"
    "131000,2021-11-10,2021-11-20,local_case\n"
    "120000,2021-11-28,2021-11-29,local_case\n"
    "152501,,,border_port\n"
)

#: The outcomes a caller may get for a bad input: an error this package raises on purpose (its status deliberate).
ACCEPTED: tuple[type[Exception], ...] = (HealthcodeError,)

E = TypeVar("E", bound=BaseException)


def clear(exc: E) -> E:
    """``exc`` after checking that it is a clear error: a non-empty message (returned for further checks)."""
    message = str(exc).strip()
    if not message:
        raise AssertionError(f"{type(exc).__name__} raised without a message")
    return exc


@functools.cache
def service() -> HealthCodeService:
    """A servicer as `healthcode serve` builds it (no store, no network): the calls under test are its methods."""
    text = (Path(__file__).resolve().parents[1] / "src/healthcode/data/default_policy.toml").read_text("utf-8")
    state = State(parse_risk_csv(RISK_CSV, "fuzz risk list"), default_policy(), text)
    settings = Settings(clock=AS_OF_TEXT, kernel_threads=1, metrics_listen="")
    return HealthCodeService(Control(state), settings, executor=None)  # type: ignore[arg-type]


def expect(fn: Callable[[], object]) -> object | None:
    """Run ``fn``; a deliberate error with a message is an accepted outcome (None), anything else propagates."""
    try:
        return fn()
    except ACCEPTED as exc:
        clear(exc)
        return None


def text_of(data: bytes) -> str:
    """Fuzzer bytes as the text a gRPC string field or a UTF-8 file would hold (undecodable bytes replaced)."""
    return data.decode("utf-8", errors="replace")


def table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def corpus_files(target: str) -> list[Path]:
    """Every seed and crash file of ``target`` (sorted; README files and dot files skipped)."""
    out: list[Path] = []
    for root in (CORPUS_DIR / target, CRASHES_DIR / target):
        if root.is_dir():
            out.extend(p for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith((".", "README")))
    return out


def run_fuzzer(check: Callable[[bytes], None], instrument: tuple[str, ...] = ("healthcode",)) -> None:
    """Start atheris on ``check`` (only from a harness's ``__main__``; atheris is imported here, lazily)."""
    import sys

    import atheris  # type: ignore[import-not-found]

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
