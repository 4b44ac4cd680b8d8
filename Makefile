# make demo   - run one real session end to end on the local stack, then stop
# make test   - lint, migration check and the whole test suite (what CI runs)
# make test-fast - the same without the end-to-end, chaos and fuzz tests (-m "not e2e and not fuzz"), for the inner loop
# make up     - run the whole stack in the foreground (API and console :8000, event streams :8001, Flower :5555, Prometheus :9090)
# make bench  - benchmarks (not part of CI)

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

export DEBUG ?= true
export DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/orchestrator
export REDIS_URL ?= redis://127.0.0.1:6379/0
export WEB_PORT ?= 8000
export FLOWER_PORT ?= 5555
export STREAM_PORT ?= 8001
# The browser tests drive Debian's chromium (ensure_services.py --tests installs it): Playwright
# never downloads a browser of its own here, and nobody runs `playwright install`.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

.PHONY: venv lock opencode services test-services up demo bench test test-fast lint format clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required: sudo apt-get install -y python3 python3-venv")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements.txt -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# Re-pin after editing requirements.in or requirements-dev.in (pip-tools); versions already
# pinned stay unless `make lock UPGRADE=--upgrade`.
LOCK := $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
	--no-emit-trusted-host --no-emit-find-links $(UPGRADE)
lock: venv
	$(LOCK) --output-file requirements.txt requirements.in
	$(LOCK) --output-file requirements-dev.txt requirements-dev.in

# The real `opencode serve` the opencode executor drives (node_modules/.bin/opencode), pinned in
# package-lock.json. Not `npm ci`: a registry that serves only this platform's binary package
# leaves the other platforms' optional packages out of the lock file, which `npm ci` then refuses
# as out of sync; `npm install` installs the locked versions from it and leaves it as it is.
node_modules/.installed: package.json package-lock.json
	@command -v npm >/dev/null || { echo "npm is required for the OpenCode server: install Node.js 18+ and npm: sudo apt-get install -y nodejs npm" >&2; exit 1; }
	npm install --no-audit --no-fund --loglevel=error
	node_modules/.bin/opencode --version
	touch $@

opencode: node_modules/.installed

services: venv
	@$(BIN)/python scripts/ensure_services.py

up: services
	scripts/up.sh

demo: venv opencode  # scripts/demo.py checks PostgreSQL and Redis for its own database
	$(BIN)/python scripts/demo.py

bench: venv opencode  # bench/env.py checks PostgreSQL and Redis for its own database
	$(BIN)/python -m bench
	$(BIN)/python -m bench --only b1 --skip-profile --broker amqp  # B1 on RabbitMQ too

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python scripts/check_secrets.py  # detect-secrets: no secret the audited .secrets.baseline lacks

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The tests that depend on the broker (marked every_broker) run a second time on RabbitMQ, in a
# vhost of their own (ensure_services.py --tests starts RabbitMQ and makes it).
export TEST_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/orchestrator_test

test-services: venv
	@$(BIN)/python scripts/ensure_services.py --tests

# The tests that start no worker process, on two pytest workers (pytest-xdist; each has a test
# database and a Redis database of its own, tests/settings.py).
FAST := -n 2 -m "not e2e and not fuzz"
# The slowest tests of each run are printed, so that a run that grows shows where.
DURATIONS := --durations=30 --durations-min=5

# Everything on two pytest workers, but the tests that restart Redis, RabbitMQ or PostgreSQL
# (marked restarts): those run alone, as they would break what runs beside them. Then the same on
# RabbitMQ, each pytest worker in a vhost of its own: tests/conftest.py picks the tests that depend
# on the broker.
test: lint test-services opencode
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/pytest -n 2 -m "not restarts" $(DURATIONS)
	$(BIN)/pytest -m restarts $(DURATIONS)
	TEST_BROKER_URL=$(TEST_AMQP_URL) $(BIN)/pytest -n 2 -m "not restarts" $(DURATIONS)
	TEST_BROKER_URL=$(TEST_AMQP_URL) $(BIN)/pytest -m restarts $(DURATIONS)

test-fast: lint test-services opencode
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/pytest $(FAST)

clean:
	rm -rf $(VENV) staticfiles .pytest_cache .ruff_cache
