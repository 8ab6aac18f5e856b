# Two entry points for a fresh machine (Python 3.11 + make): `make demo`, `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
export UV_PYTHON_DOWNLOADS := never

.PHONY: install demo test lint lock clean bench bench-smoke

install: $(VENV)/.installed

# compiled at install: with PYTHONDONTWRITEBYTECODE set (as on CI's machines) every process
# would otherwise compile Dagster's thousand modules again, 3 to 5 s a `crm-assets` command
$(VENV)/.installed: pyproject.toml requirements.lock Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip sync -q --compile-bytecode --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m compileall -q crm_assets
	touch $@

demo: install
	$(BIN)/crm-assets demo

# two workers, each taking whole test files (a file's servers and fixtures stay in one process)
PYTEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# the one-host deployment (docs/deploy.md) on this machine: DAGSTER_PG_URL names its database
.PHONY: deploy-local
deploy-local: install
	$(BIN)/python deploy/local.py $(DEPLOY_LOCAL_ARGS)

bench: install
	$(BIN)/python -m benchmarks.bench

bench-smoke: install
	$(BIN)/python -m benchmarks.bench --smoke

lint: install
	$(BIN)/ruff check crm_assets crm_assets_tests benchmarks deploy
	$(BIN)/ruff format --check crm_assets crm_assets_tests benchmarks deploy

lock:
	$(BIN)/uv pip compile pyproject.toml --group dev --python-version 3.11 \
		--generate-hashes --no-header -q -o requirements.lock

clean:
	rm -rf $(VENV) .dagster_home .crm_sync
