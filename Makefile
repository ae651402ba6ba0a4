# healthcode: `make serve` and `make test` work on a fresh machine with Python 3.10+, git and a C compiler.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
KERNEL := $(VENV)/.kernel-built
DEMO   ?= demo
DEMO_ROWS ?= 200000
AS_OF  ?= 2021-11-30T12:00:00+08:00

.PHONY: build serve test lint bench bench-full clean java

build: $(KERNEL)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Build requirements first, then the package (editable) with its dev extras.
$(STAMP): pyproject.toml setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q "setuptools>=68" wheel "Cython>=3.0" "numpy>=2.0" "grpcio-tools>=1.60"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev,spark]"
	touch $@

# Rebuild the Cython kernel in place whenever its source changes.
$(KERNEL): $(STAMP) $(wildcard src/healthcode/rules/*.pyx src/healthcode/rules/*.pxi src/healthcode/rules/*.pxd proto/healthcode/v1/*.proto)
	$(BIN)/python setup.py -q build_ext --inplace
	touch $@

LISTEN ?= 127.0.0.1:50051

# The server on the shipped policy, the demo risk list and a store holding the demo population (loaded once),
# its clock fixed at the demo instant; the demo population is also evaluated once at start-up.
serve: build
	@test -f $(DEMO)/population.parquet || $(BIN)/healthcode generate $(DEMO) --rows $(DEMO_ROWS) --seed 1
	@test -f $(DEMO)/store.duckdb || $(BIN)/healthcode load $(DEMO)/population.parquet --store $(DEMO)/store.duckdb
	$(BIN)/healthcode serve --listen $(LISTEN) --risk $(DEMO)/risk.csv --store $(DEMO)/store.duckdb --clock $(AS_OF) \
		--demo-population $(DEMO)/population.parquet --demo-as-of $(AS_OF)

lint: build
	$(BIN)/ruff check src tests benchmarks setup.py
	$(BIN)/mypy src/healthcode

# The Spark job's tests need a JVM (Java 17+); say how to get one instead of failing deep inside pyspark.
java:
	@command -v java >/dev/null 2>&1 || { echo "Java is missing: the Spark job (healthcode.spark) needs Java 17+." \
		"Install it, e.g. 'apt-get install openjdk-17-jre-headless' (Debian/Ubuntu), then run make again." >&2; exit 1; }

test: build lint java
	$(BIN)/python -m pytest -q -m "not slow" tests
	# The service, security and limit tests again, the server behind its shedding front (an exposed server's setup)
	HEALTHCODE_TEST_FRONT=on $(BIN)/python -m pytest -q -m "not slow" tests/service/test_service.py tests/service/test_security.py \
		tests/service/test_limits.py tests/service/test_overload.py
	$(BIN)/python -m pytest -q benchmarks --benchmark-enable --benchmark-only --quick
	$(BIN)/python benchmarks/bench_service.py --quick
	$(BIN)/python benchmarks/bench_store.py --quick
	$(BIN)/python benchmarks/bench_load.py --quick
	$(BIN)/python benchmarks/bench_spark.py --quick

# The full benchmark figures (docs/benchmarks.md).  The store part defaults to 2M persons (a few minutes);
# the Beijing scale is `make bench STORE_ROWS=22000000` (45+ minutes, ~22 GB of disk).
STORE_ROWS ?= 2000000
bench: build
	$(BIN)/python -m pytest -q benchmarks --benchmark-enable --benchmark-only -s
	$(BIN)/python benchmarks/bench_service.py
	$(BIN)/python benchmarks/bench_store.py --rows $(STORE_ROWS)
	$(BIN)/python benchmarks/bench_load.py
	$(BIN)/python benchmarks/bench_spark.py

clean:
	rm -rf build $(VENV) src/healthcode/rules/*.so src/healthcode/rules/_kernel.c src/healthcode/rules/*.html .pytest_cache .benchmarks
