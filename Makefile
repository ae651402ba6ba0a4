# healthcode: `make serve` and `make test` work on a fresh machine with Python 3.10+, git and a C compiler.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
KERNEL := $(VENV)/.kernel-built
LOCK   := requirements.lock
DEMO   ?= demo
DEMO_ROWS ?= 200000
AS_OF  ?= 2021-11-30T12:00:00+08:00

.PHONY: build serve test lint lock release-proto bench bench-full clean java

build: $(KERNEL)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The exact versions in requirements.lock (hash-checked; it holds the build requirements too), then the package
# itself (editable) on top of them.  The lock is for CPython 3.11 on Linux x86_64: another interpreter gets
# pyproject.toml's ranges, unpinned, instead.
LOCK_TARGET := import sys, platform; sys.exit(not (sys.version_info[:2] == (3, 11) and sys.platform == "linux" \
	and platform.machine() == "x86_64"))
$(STAMP): $(LOCK) pyproject.toml setup.py | $(BIN)/python
	@if $(BIN)/python -c '$(LOCK_TARGET)'; then \
		echo "installing $(LOCK) into $(VENV)/"; \
		$(BIN)/python -m pip install -q --require-hashes -r $(LOCK) && \
		$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . ; \
	else \
		echo "$(LOCK) is for CPython 3.11 on Linux x86_64, not this Python: installing pyproject.toml's ranges unpinned"; \
		$(BIN)/python -m pip install -q "setuptools>=77" wheel "Cython>=3.0" "numpy>=2.0" "grpcio-tools>=1.60" && \
		$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev,spark]" ; \
	fi
	@$(BIN)/python -c "$$LOCK_CHECK"
	touch $@

# Every requirement of pyproject.toml (its dev and spark extras too) is installed in a version it accepts: a
# dependency added to pyproject.toml without `make lock` fails here, naming it, rather than in a test.
define LOCK_CHECK
import sys
from importlib.metadata import PackageNotFoundError, requires, version
from packaging.requirements import Requirement
unmet = []
for line in requires("healthcode") or []:
    req = Requirement(line)
    if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", "dev", "spark")):
        continue
    try:
        have = version(req.name)
    except PackageNotFoundError:
        have = "not installed"
    if have == "not installed" or not req.specifier.contains(have, prereleases=True):
        unmet.append(f"{req.name}{req.specifier} ({have})")
if unmet:
    sys.exit(f"pyproject.toml asks for what requirements.lock does not give: {', '.join(unmet)}; run 'make lock'")
endef
export LOCK_CHECK

# Refresh requirements.lock: resolve pyproject.toml's dev and spark extras (which hold the build requirements) to
# the newest versions allowed, with hashes, for CPython 3.11 on Linux x86_64 whatever machine runs it; nothing is
# installed.  `make lock LOCK_UPGRADE=` keeps the current pins that still fit (after adding a dependency, say): uv
# starts from the pins alone, without their hashes, which it would otherwise take on trust.
# The file is replaced only when the resolution succeeds and changes it.  After a refresh, run make test and
# make bench: the figures move with the versions.
LOCK_UPGRADE ?= --upgrade
lock: | $(BIN)/python
	@test -x $(BIN)/uv || $(BIN)/python -m pip install -q "$$(grep -o '^uv==[^ ]*' $(LOCK) || echo uv)"
	@rm -f $(LOCK).new; test ! -f $(LOCK) || sed -nE 's/^([A-Za-z0-9][^ ]*==[^ ]*).*/\1/p' $(LOCK) > $(LOCK).new
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra spark --generate-hashes --quiet $(LOCK_UPGRADE) \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" \
		--output-file $(LOCK).new
	@{ echo "# The exact versions (with their hashes) that make installs: the versions the tests and the figures in"; \
	   echo "# docs/ ran with.  For CPython 3.11 on Linux x86_64.  'make lock' refreshes it; 'pip install .' stays"; \
	   echo "# unpinned (pyproject.toml's ranges)."; cat $(LOCK).new; } > $(LOCK).tmp && rm -f $(LOCK).new
	@if cmp -s $(LOCK).tmp $(LOCK); then rm -f $(LOCK).tmp; echo "$(LOCK) is unchanged"; \
	else mv $(LOCK).tmp $(LOCK); echo "wrote $(LOCK): $$(grep -c '^[A-Za-z0-9]' $(LOCK)) packages"; fi

# Rebuild the Cython kernel in place whenever its source changes.
$(KERNEL): $(STAMP) $(wildcard src/healthcode/rules/*.pyx src/healthcode/rules/*.pxi src/healthcode/rules/*.pxd proto/healthcode/v1/*.proto)
	$(BIN)/python setup.py -q build_ext --inplace
	touch $@

LISTEN ?= 127.0.0.1:50051

# The server on the shipped policy, the demo risk list and a store holding the demo population (loaded once),
# its clock fixed at the demo instant; the demo population is also evaluated once at start-up.
# demo/.rows records the DEMO_ROWS the demo was made with; another DEMO_ROWS (or a demo/ without the record) makes
# it again: population, risk list and store.
serve: build
	@made=$$(cat $(DEMO)/.rows 2>/dev/null || true); \
	if [ "$$made" != "$(DEMO_ROWS)" ]; then \
		if [ -n "$$made" ]; then \
			echo "DEMO_ROWS=$(DEMO_ROWS) but $(DEMO)/ holds $$made rows: regenerating its population, risk list and store"; \
		elif [ -e $(DEMO)/population.parquet ] || [ -e $(DEMO)/store.duckdb ]; then \
			echo "$(DEMO)/ does not say how many rows it holds ($(DEMO)/.rows): regenerating it with DEMO_ROWS=$(DEMO_ROWS)"; \
		fi; \
		rm -f $(DEMO)/.rows $(DEMO)/population.parquet $(DEMO)/risk.csv $(DEMO)/store.duckdb $(DEMO)/store.duckdb.wal; \
		$(BIN)/healthcode generate $(DEMO) --rows $(DEMO_ROWS) --seed 1 && \
		$(BIN)/healthcode load $(DEMO)/population.parquet --store $(DEMO)/store.duckdb && \
		echo "$(DEMO_ROWS)" > $(DEMO)/.rows; \
	fi
	$(BIN)/healthcode serve --listen $(LISTEN) --risk $(DEMO)/risk.csv --store $(DEMO)/store.duckdb --clock $(AS_OF) \
		--demo-population $(DEMO)/population.parquet --demo-as-of $(AS_OF)

# buf lint: the STANDARD rules (proto/buf.yaml).  buf breaking: the FILE rules against the previous release's proto
# in api/released/ (see its README.md); skipped, saying so, until a release has put one there.
RELEASED := api/released
lint: build
	$(BIN)/ruff check src tests benchmarks setup.py
	$(BIN)/mypy src/healthcode
	$(BIN)/buf lint proto
	@if [ -n "$$(find $(RELEASED) -name '*.proto' 2>/dev/null)" ]; then \
		echo "$(BIN)/buf breaking proto --against $(RELEASED)"; $(BIN)/buf breaking proto --against $(RELEASED); \
	else \
		echo "buf breaking: skipped, $(RELEASED)/ holds no released proto yet (make release-proto puts one there)"; \
	fi

# When cutting a release: the current proto (which must pass buf lint) becomes the baseline of buf breaking.
release-proto: build
	$(BIN)/buf lint proto
	rm -rf $(RELEASED)/healthcode
	cd proto && find . -name '*.proto' -exec cp --parents {} ../$(RELEASED)/ \;
	$(BIN)/buf build $(RELEASED) -o /dev/null
	@echo "$(RELEASED)/ now holds the proto of this release: commit it with the release"

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
	$(BIN)/python benchmarks/bench_change_log.py --quick
	$(BIN)/python benchmarks/bench_load.py --quick
	$(BIN)/python benchmarks/bench_spark.py --quick

# The full benchmark figures (docs/benchmarks.md).  The store part defaults to 2M persons (a few minutes);
# the Beijing scale is `make bench STORE_ROWS=22000000` (45+ minutes, ~22 GB of disk).
STORE_ROWS ?= 2000000
bench: build
	$(BIN)/python -m pytest -q benchmarks --benchmark-enable --benchmark-only -s
	$(BIN)/python benchmarks/bench_service.py
	$(BIN)/python benchmarks/bench_store.py --rows $(STORE_ROWS)
	$(BIN)/python benchmarks/bench_change_log.py
	$(BIN)/python benchmarks/bench_load.py
	$(BIN)/python benchmarks/bench_spark.py

clean:
	rm -rf build $(VENV) src/healthcode/rules/*.so src/healthcode/rules/_kernel.c src/healthcode/rules/*.html .pytest_cache .benchmarks
