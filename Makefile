# Everything a new machine needs, from a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test check lint typecheck docs pytest pytest-framework browser wrk bench bench-db bench-api bench-pages bench-waits fill profile profile-system profile-api drill demo clean

# The framework (editable, with its extras: `api`, `metrics`, `tracing`) and, from
# pyproject.toml's dependency groups, what the reference project and the tests need: neither is
# in the wheel's metadata. pip installs dependency groups (`--group`, PEP 735) from version 25.1.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade 'pip>=25.1'
	$(BIN)/pip install --quiet -e '.[api,metrics,tracing]' --group dev
	touch $(STAMP)

install: $(STAMP)

## The stack, supervised: web server (PORT, default 8000), Celery worker (WORKER_CONCURRENCY, default 2), beat.
run: install
	$(BIN)/python -m sagaproject.stack

## The whole suite: lint, type check, the docs, tests (fresh test database).
test: lint typecheck docs pytest pytest-framework

## The fast loop: lint, type check and the tests that run no process of their own (no worker,
## server or browser; `-m "not system"`), on the test database of the last run.
check: lint typecheck
	$(BIN)/pytest -m "not system" -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy sagas sagaproject orders payments inventory shipping testapp

## The documentation site (Sphinx, MyST, Furo) in docs/_build/html, warnings as errors.
docs: install
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

## In PYTEST_PROCESSES processes (pytest-xdist), a test module each at a time: the modules that
## start workers or servers wait on them far more than they use a core.
PYTEST_PROCESSES ?= 2
pytest: install browser
	$(BIN)/pytest --create-db -n $(PYTEST_PROCESSES) --dist loadfile $(PYTEST_ARGS)

## The framework's own tests, on the test project of `sagas` alone (testapp/).
pytest-framework: install
	$(BIN)/pytest -c testapp/pytest.ini --rootdir=testapp --create-db testapp/tests $(FRAMEWORK_PYTEST_ARGS)

## Debian's Chromium for the admin browser test (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else \
			echo "chromium is not installed: the browser test will be skipped (install Debian's chromium package to run it)"; \
		fi; }

## Benchmark: order saga vs bare Celery chain, and a group vs a bare chord (BENCH_ARGS="--sagas 300 --scaling").
bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

## What a step costs PostgreSQL (CPU, WAL by table and index, statements, commits, round trips,
## HOT updates), the synthetic and order sagas against a bare task, on a private cluster
## (DB_BENCH_ARGS="--sagas 300 --batches 3").
bench-db: install
	$(BIN)/python -m bench.db $(DB_BENCH_ARGS)

## A benchmark database of finished sagas, by SQL (FILL_ARGS="--sagas 1000000 --database NAME").
fill: install
	$(BIN)/python -m bench.fill $(FILL_ARGS)

## Admin pages, API lists and a sweep, timed on that database (PAGES_ARGS="--database NAME").
bench-pages: install
	$(BIN)/python -m bench.pages $(PAGES_ARGS)

## Waits at scale: 100,000 waiting sagas (added by SQL), the due waits, a wake and a sweep, the lists of waiting sagas, signal to resume and timeouts' lateness with workers and beat (WAITS_ARGS="--sagas 100000 --database NAME").
bench-waits: install
	$(BIN)/python -m bench.waits $(WAITS_ARGS)

## Where a step's time goes: the engine driven in-process under pyinstrument (PROFILE_ARGS="--steps 16").
profile: install
	$(BIN)/python -m bench.profile_step $(PROFILE_ARGS)

## Where a step's time goes across the system: CPU of workers, PostgreSQL, Redis; sends per step (PROFILE_ARGS="--round-trips"; "--group": a group saga vs a bare chord).
profile-system: install
	$(BIN)/python -m bench.breakdown $(PROFILE_ARGS)

## Debian's wrk for the API load benchmark (bench-api).
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; \
		else \
			echo "wrk is not installed: install Debian's wrk package to run bench-api" >&2; exit 1; \
		fi; }

## API load: POST /api/orders/ and its ceiling through gunicorn, driven by wrk (BENCH_API_ARGS="--duration 20").
bench-api: install wrk
	$(BIN)/python -m bench.api_load $(BENCH_API_ARGS)

## Where a request's time goes: POST /api/orders/ and the ceiling in-process, under pyinstrument (PROFILE_API_ARGS="--show-sql").
profile-api: install
	$(BIN)/python -m bench.profile_api $(PROFILE_API_ARGS)

## Fault-injection drill on its own embedded servers (DRILL_ARGS="--sagas 1000 ...").
drill: install
	$(BIN)/python -m sagaproject.drill $(DRILL_ARGS)

## Submit a batch of demo orders to a running stack and print the outcomes, with orders that wait:
## for a 3-D Secure confirmation (the gateway's webhook; an abandoned one times out after
## ORDERS_CONFIRM_TIMEOUT, 5 s here) and for an operator's review above ORDERS_REVIEW_ABOVE (500
## here), which the demo approves and rejects; each order's lines reserved at once (a group: one
## runs out of stock, the other is compensated) and its shipment as a child saga (compensated with
## its order for an unsupported destination). All are read by the demo, which submits the orders.
demo: install
	ORDERS_REVIEW_ABOVE=500 ORDERS_CONFIRM_TIMEOUT=5 ORDERS_RESERVE_EACH_LINE=1 ORDERS_SHIP_AS_CHILD=1 $(BIN)/python manage.py demo_orders

clean:
	rm -rf $(VENV) .local test-artifacts docs/_build .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
