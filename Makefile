# SynthCell Studio: `make run` starts the app on its sample data, `make test` runs the tests.
# Both set everything up first and skip what is already done.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8501
SHARED_DATA := $(abspath ../shared/data)
DATA_DIR := $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)
SAMPLES := sample_data/mock_paired_demo.h5ad sample_data/mock_bridge_demo.h5ad
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test setup setup-dev browser sample-data lint bench bench-peers-env clean

WORKSPACE ?= $(or $(SYNTHCELL_WORKSPACE),workspace)

run: setup sample-data
	@[ -n "$$(ls $(WORKSPACE)/datasets 2>/dev/null)" ] || \
		SYNTHCELL_WORKSPACE=$(WORKSPACE) $(BIN)/python -m engine --quiet import \
		sample_data/mock_paired_demo.h5ad --name "demo: mock paired (sample_data)" >/dev/null
	SYNTHCELL_WORKSPACE=$(WORKSPACE) SYNTHCELL_DATA_DIR=$(DATA_DIR) \
		$(BIN)/streamlit run app.py --server.port $(PORT)

test: setup-dev browser
	$(BIN)/python -m pytest

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# Debian's chromium for the browser tests (Playwright drives it; it downloads no browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
		$(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# The demo datasets are made by the mock generator (no external data in the repo).
sample-data: $(SAMPLES)

sample_data/mock_paired_demo.h5ad: | $(VENV)/.installed
	$(BIN)/python -m engine --quiet mock --scenario paired --n-cells 1500 --n-genes 1000 \
		--seed 7 --out $@

sample_data/mock_bridge_demo.h5ad: | $(VENV)/.installed
	$(BIN)/python -m engine --quiet mock --scenario bridge --n-cells 1500 --n-genes 1000 \
		--seed 11 --out $@

lint: setup-dev
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/run_all.py

# The peer tools (scvi-tools, scdesigner) for bench/bench_dp_nmf_realism.py live in their own
# environment, so their torch and dependency pins never touch the project's .venv.
PEERS_VENV := bench/.venv-peers

bench-peers-env: $(PEERS_VENV)/.installed

$(PEERS_VENV)/.installed: bench/peers/requirements.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --disable-pip-version-check \
		-r bench/peers/requirements.txt
	touch $@

clean:
	rm -rf $(VENV) workspace
