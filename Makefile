# Two commands set up a fresh machine: `make demo` and `make test`. Each installs what it needs itself.
# Python 3.11 to 3.13 (the versions the suite passes on): the first of python3.11, python3.12, python3.13 and python3
# that runs as one (a pyenv shim of a version not installed does not); PYTHON=... wins.
SUPPORTED_PYTHON := import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))
ifndef PYTHON
PYTHON := $(or $(firstword $(foreach p,python3.11 python3.12 python3.13 python3,\
	$(shell $(p) -c '$(SUPPORTED_PYTHON)' 2>/dev/null && command -v $(p)))),python3.11)
endif
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install browser postgres lint test test-fast demo bench bench-quick protos clean

# The extras `make demo` and `make test` need (pyproject.toml), at the versions pinned in constraints.txt.
EXTRAS := client,train,server,dashboard,postgres,test
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c '$(SUPPORTED_PYTHON)' 2>/dev/null || { echo "error: make needs Python 3.11, 3.12 or 3.13" \
		"(python3.11, python3.12, python3.13 or python3 on PATH, or PYTHON=...); $(PYTHON) is missing or another version" >&2; exit 1; }
	@# Debian and Ubuntu ship venv's ensurepip apart (python3.X-venv): installed like chromium below, when root.
	@test -x $(PY) || $(PYTHON) -c 'import ensurepip' 2>/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || { \
		apt-get update -q && apt-get install -y -q \
		python$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

## Debian's chromium for the dashboard's browser test (CI must run it); installed only when missing and root.
browser:
	@test -x /usr/bin/chromium || [ "$$(id -u)" != 0 ] || { apt-get update -q && apt-get install -y -q chromium; } \
		|| echo "warning: could not install chromium: the dashboard browser test fails in CI, skips elsewhere"

## Debian's PostgreSQL for the Postgres ledger tests (CI must run them); installed only when missing and root.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; } \
		|| echo "warning: could not install postgresql: the Postgres ledger tests fail in CI, skip elsewhere"

## Style and types: ruff's lint and format check over the repository, mypy on the three packages (strict on the core).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## The whole suite (CPU only, tiny models). Two pytest workers, since most slow tests wait on Ray and server
## subprocesses; whole modules per worker (module fixtures start once), slow modules first (tests/conftest.py).
## The tests marked dtype("auto") run twice in it: as this CPU resolves auto, and with auto forced to the dtype it
## does not pick (bf16 where it is float32, float32 where it is bf16: tests/dtype_marks.py), so both run everywhere.
PYTEST := $(VENV)/bin/pytest -q -ra -n 2 --dist loadscope --no-loadscope-reorder
test: install browser postgres
	$(PYTEST) --durations=15 tests

## The demo: teacher server + a key per KD student + three students at once (no KD, full KD, MaskedKD-50) + their
## accuracies and bills side by side + the dashboard.
## `make demo DEMO_ARGS=--exit` exits when done instead of keeping the dashboard up.
DEMO_ARGS ?=
demo: install
	$(PY) scripts/demo.py $(DEMO_ARGS)

## Benchmarks: docs/benchmarks.md, docs/benchmarks.json and docs/bench_*.png from one run. Run it alone on a quiet
## machine (other load skews the ratios; the report warns when the matmul rate drifted during the run).
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS),bench]'
	touch $(BENCH_STAMP)

bench: install $(BENCH_STAMP)
	$(PY) -m benchmarks --out docs

## The same sections on tiny models with one repeat (what the tests run): checks that the suite works, in ~30 s.
bench-quick: install $(BENCH_STAMP)
	$(PY) -m benchmarks --quick --out out/bench-quick

## Regenerate the Python stubs maskedkd/v1/ from the contract protos/maskedkd/v1/teacher.proto (tests fail when they drift).
protos: install
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. maskedkd/v1/teacher.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
