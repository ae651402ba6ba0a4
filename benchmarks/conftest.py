"""Benchmark options, cached generated populations, and the summary printed at the end of the run.

``--quick`` (CI): 100k rows and 3 rounds per case, the whole pass well under a minute.
``--rows 1000000,10000000``: the population sizes (default 1M and 10M; DuckDB runs on each).
"""

from __future__ import annotations

import pyarrow as pa
import pytest

import healthcode
from healthcode.generate import DEFAULT_AS_OF, generate_risk_csv, generate_table

DEFAULT_ROWS = (1_000_000, 10_000_000)
QUICK_ROWS = (100_000,)
SEED = 2021
_RESULTS = pytest.StashKey[dict]()
_BYTES = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("healthcode benchmarks")
    group.addoption("--quick", action="store_true", default=False,
                    help="tiny sizes and few rounds (CI smoke pass, < 1 minute)")
    group.addoption("--rows", default=None,
                    help="comma-separated population sizes (default 1000000,10000000; 100000 with --quick)")


def bench_sizes(config: pytest.Config) -> list[int]:
    text = config.getoption("--rows")
    if text:
        try:
            sizes = sorted({int(x.replace("_", "")) for x in text.split(",") if x.strip()})
        except ValueError:
            raise pytest.UsageError(f"--rows takes comma-separated integers, got {text!r}") from None
        if not sizes or sizes[0] < 1:
            raise pytest.UsageError(f"--rows sizes must be >= 1, got {text!r}")
        return sizes
    return list(QUICK_ROWS if config.getoption("--quick") else DEFAULT_ROWS)


def rounds_for(config: pytest.Config, rows: int) -> int:
    if config.getoption("--quick"):
        return 3
    return 5 if rows <= 2_000_000 else 3


def _label(rows: int) -> str:
    if rows % 1_000_000 == 0:
        return f"{rows // 1_000_000}M"
    if rows % 1_000 == 0:
        return f"{rows // 1_000}k"
    return str(rows)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = {}
    config.stash[_BYTES] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    sizes = bench_sizes(metafunc.config)
    if "rows" in metafunc.fixturenames:
        metafunc.parametrize("rows", sizes, ids=[_label(n) for n in sizes], scope="session")
    if "small_rows" in metafunc.fixturenames:
        metafunc.parametrize("small_rows", sizes[:1], ids=[_label(sizes[0])], scope="session")


class Populations:
    """Generated populations, one per size and itinerary mode, kept for the whole session."""

    def __init__(self) -> None:
        self.tables: dict[tuple[int, str], pa.Table] = {}

    def get(self, rows: int, itineraries: str = "beijing") -> pa.Table:
        key = (rows, itineraries)
        if key not in self.tables:
            self.tables[key] = generate_table(rows, seed=SEED, as_of=DEFAULT_AS_OF, itineraries=itineraries)
        return self.tables[key]


@pytest.fixture
def bench_rounds(request: pytest.FixtureRequest):
    """``bench_rounds(rows)``: how many timed rounds a case of ``rows`` rows gets."""
    return lambda rows: rounds_for(request.config, rows)


@pytest.fixture(scope="session")
def populations() -> Populations:
    return Populations()


@pytest.fixture(scope="session")
def risk_list() -> healthcode.RiskList:
    return healthcode.parse_risk_csv(generate_risk_csv(SEED, DEFAULT_AS_OF))


@pytest.fixture(scope="session")
def risk_csv_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same risk list as a CSV file (what a user passes)."""
    path = tmp_path_factory.mktemp("risk") / "risk.csv"
    path.write_text(generate_risk_csv(SEED, DEFAULT_AS_OF), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def timeline() -> healthcode.PolicyTimeline:
    return healthcode.default_policy()


@pytest.fixture
def record(request: pytest.FixtureRequest):
    """``record(case, rows, threads, benchmark, itineraries, form)``: keep the benchmark's median for the summary."""

    def _record(case: str, rows: int, threads: int, benchmark, itineraries: str = "beijing",
                form: str = "loaded") -> None:  # fmt: skip
        meta = getattr(benchmark, "stats", None)
        stats = getattr(meta, "stats", None)
        if stats is not None:
            request.config.stash[_RESULTS][(case, itineraries, form, rows, threads)] = stats.median

    return _record


@pytest.fixture
def record_bytes(request: pytest.FixtureRequest):
    def _record(rows: int, itineraries: str, per_row: float, per_row_both_nat: float) -> None:
        request.config.stash[_BYTES][(rows, itineraries)] = (per_row, per_row_both_nat)

    return _record


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    import duckdb

    results: dict = config.stash.get(_RESULTS, {})
    if not results:
        return
    tr = terminalreporter
    tr.write_sep("=", f"healthcode: kernel vs DuckDB {duckdb.__version__} SQL (medians, 1 DuckDB thread)")
    tr.write_line(f"{'case':<8} {'itineraries':<11} {'risk':<7} {'rows':>12} {'threads':>7} {'median s':>10} "
                  f"{'rows/s':>14}")  # fmt: skip
    for (case, itin, form, rows, threads), median in sorted(results.items(), key=lambda kv: (kv[0][0] != "kernel",
                                                                                             kv[0])):  # fmt: skip
        tr.write_line(f"{case:<8} {itin:<11} {form:<7} {rows:>12,} {threads:>7} {median:>10.4f} "
                      f"{rows / median:>14,.0f}")  # fmt: skip
    for (case, itin, form, rows, _threads), median in sorted(results.items()):
        if case != "duckdb":
            continue
        kernel = results.get(("kernel", itin, form, rows, 1))
        if kernel:
            tr.write_line(f"kernel(1 thread) / DuckDB {duckdb.__version__} (1 thread), {itin} itineraries, risk list "
                          f"{form}, {rows:,} rows: {median / kernel:.1f}x")  # fmt: skip
    for (case, itin, form, rows, threads), median in sorted(results.items()):
        if case == "kernel" and threads == 2 and ("kernel", itin, form, rows, 1) in results:
            one = results[("kernel", itin, form, rows, 1)]
            tr.write_line(f"kernel 2 threads / 1 thread, {itin} itineraries, risk list {form}, {rows:,} rows: "
                          f"{one / median:.2f}x")  # fmt: skip
    for (rows, itin), (per_row, both) in sorted(config.stash.get(_BYTES, {}).items()):
        tr.write_line(
            f"kernel reads {per_row:.1f} bytes/row of Arrow buffers at {rows:,} rows, {itin} itineraries "
            f"(default policy: NAT report column only; {both:.1f} bytes/row counting both NAT columns)"
        )
