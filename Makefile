# Two commands set up a fresh machine: `make demo` and `make test`. Each installs what it needs itself.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo bench protos clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## The whole suite (CPU only, tiny models; about 10 minutes on 2 cores).
test: install
	$(VENV)/bin/pytest -q -ra --durations=15 tests

## Regenerate the Python stubs from protos/ (tests fail when they drift).
protos: install
	cd protos && ../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. maskedkd/v1/teacher.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
