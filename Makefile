# make demo   - run one real session end to end on the local stack, then stop
# make test   - lint, migration check and the whole test suite (what CI runs)
# make up     - run the whole stack in the foreground (API :8000, Flower :5555)
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

.PHONY: venv services up demo bench test lint format clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required: sudo apt-get install -y python3 python3-venv")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

services: venv
	@$(BIN)/python scripts/ensure_services.py

up: services
	scripts/up.sh

demo: venv  # scripts/demo.py checks PostgreSQL and Redis for its own database
	$(BIN)/python scripts/demo.py

bench: venv  # bench/env.py checks PostgreSQL and Redis for its own database
	$(BIN)/python -m bench

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint services
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/pytest

clean:
	rm -rf $(VENV) staticfiles .pytest_cache .ruff_cache
