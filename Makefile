# The two commands: `make serve` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install serve test test-pure lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Train the demo models if missing, start an embedded Redis unless RDV_REDIS_URL is set,
## and serve the gateway with its workers and the log bin on http://127.0.0.1:8000.
serve: install
	$(BIN)/rdv serve

## Lint and type-check, then run the test suite against a real redis-server that the suite
## starts itself. While working: `make test-pure` (no server, under a minute), `.venv/bin/pytest -m integration`.
## The suite runs in TEST_WORKERS processes (pytest-xdist), a test file to a process: about half
## of its time waits on servers, sleeps and load windows, so a third process on two cores
## fills those waits (468-485 s against 539 with two in the same hour; fresh-clone CI 435-539 s
## against 498-613 s with two, as fast or slow as the host is that hour).
## Each process starts its own Redis and cluster. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test-pure: install
	$(BIN)/pytest -m pure -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

.PHONY: bench

## Benchmark rdv serve against an in-process FastAPI app and MLServer (installed on first use
## into benchmarks/.venv-mlserver), then issue 18's cost axes (challengers, rows, deployments,
## a 10-minute soak); one results JSON in benchmarks/results/. QUICK=1: a short run.
## AXES=soak,deployments: those axes only; AXES=none: none (the systems alone).
bench: install
	$(BIN)/python -m benchmarks.run $(if $(QUICK),--quick) $(if $(AXES),--axes $(AXES)) $(BENCH_ARGS)

.PHONY: bench-drift

## The drift benchmark (issue 16): a fresh rdv serve at 400 requests/s, faults injected one at a
## time; requests to first alert and to clear, false alarms on stationary traffic (live and
## offline); results in benchmarks/results/drift-*. QUICK=1: a short run.
bench-drift: install
	$(BIN)/python -m benchmarks.drift_bench $(if $(QUICK),--quick) $(DRIFT_ARGS)

.PHONY: bench-axes

## Cost as the work grows (issue 18), the axes alone: three shadowing challengers against none
## at c64, 100-row requests against the in-process baseline, 20 deployments on one host, a
## 10-minute soak; results in benchmarks/results/axes-*. AXES=challengers,rows picks some;
## AXES_ARGS="--layout both --soak-hour" for more.
bench-axes: install
	$(BIN)/python -m benchmarks.axes $(if $(AXES),--axes $(AXES)) $(AXES_ARGS)
