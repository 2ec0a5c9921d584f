# quiclb — every target creates the virtualenv in .venv on demand.
# `make help` lists the targets.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_FLAGS ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

# A fresh Debian has python3 without ensurepip; install python3-venv when venv creation fails.
$(PY):
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed; installing python3-venv with apt-get"; \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq python3-venv >/dev/null && \
	  $(PYTHON) -m venv $(VENV); }

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade 'pip>=25.1'
	$(PY) -m pip install -q --group dev -e .
	@# Tests drive independent programs (Debian packages, one apt-get update for all): ngtcp2's
	@# QUIC client for the interop tests, headless Chromium for the status-page test,
	@# systemd-analyze to verify deploy/systemd (the package is not started in a container), and
	@# BIRD 2 for the scale-out topology (BGP in network namespaces; its service is not started).
	@missing=""; \
	  command -v gtlsclient >/dev/null || missing="$$missing ngtcp2-client"; \
	  command -v bird >/dev/null || [ -x /usr/sbin/bird ] || missing="$$missing bird2"; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    echo "installing$$missing with apt-get"; \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	  fi
	@touch $(STAMP)

.PHONY: install
install: $(STAMP) ## create .venv and install quiclb with its test and lint tools

.PHONY: lint
lint: $(STAMP) ## ruff and mypy (strict)
	$(VENV)/bin/ruff check lb backends quiclb_harness tests bench
	$(VENV)/bin/mypy

.PHONY: format
format: $(STAMP) ## ruff format + autofix
	$(VENV)/bin/ruff format lb backends quiclb_harness tests bench
	$(VENV)/bin/ruff check --fix lb backends quiclb_harness tests bench

.PHONY: pytest
pytest: $(STAMP) ## the test suite alone (opt-in sizes excluded)
	$(VENV)/bin/pytest -m "not optin" $(PYTEST_FLAGS)

.PHONY: test
test: lint pytest ## lint + the whole test suite (what CI runs)

.PHONY: test-optin
test-optin: $(STAMP) ## the nightly-size acceptance runs
	$(VENV)/bin/pytest -m optin $(PYTEST_FLAGS)

.PHONY: demo
demo: $(STAMP) ## the main job: an LB and three backends on loopback, real QUIC clients through them
	$(VENV)/bin/quiclb demo

.PHONY: demo-scaleout
demo-scaleout: ## 3 LBs behind one VIP: namespaces, kernel ECMP, BGP (BIRD), real QUIC clients (root); numbers -> bench/reference/scaleout.json
	@if [ "$$(id -u)" != 0 ]; then \
	  echo "make demo-scaleout needs root: it creates network namespaces, veths and routes (run: sudo make demo-scaleout)"; \
	  exit 1; fi
	@$(MAKE) --no-print-directory $(STAMP)
	$(VENV)/bin/quiclb demo-scaleout --out bench/reference/scaleout.json

# The bench dependency group (matplotlib, for the load benchmark's plot), installed once.
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q --group bench
	@touch $(BENCH_STAMP)

.PHONY: bench
bench: $(BENCH_STAMP) bench-nginx ## micro-benchmarks, Maglev quality, then the full load set (~15 min); JSON + PNG in bench/results/
	$(PY) bench/micro_codec.py --save
	$(PY) bench/micro_router.py --save
	$(PY) bench/micro_datapath.py --save
	$(PY) bench/micro_cold.py --save
	$(PY) bench/hash_quality.py --save
	$(PY) bench/load_bench.py --full

# nginx is a baseline: installed with its stream module when missing (root), else the command is printed.
.PHONY: bench-nginx
bench-nginx:
	@if ! command -v nginx >/dev/null || ! dpkg -s libnginx-mod-stream >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing nginx and its stream module with apt-get"; \
	    apt-get update -qq && apt-get install -y -qq nginx libnginx-mod-stream >/dev/null; \
	  else \
	    echo "nginx (with libnginx-mod-stream) is missing: the nginx targets will be skipped. Install it with:"; \
	    echo "  sudo apt-get update -qq && sudo apt-get install -y -qq nginx libnginx-mod-stream"; \
	  fi; \
	fi

.PHONY: bench-load
bench-load: $(BENCH_STAMP) bench-nginx ## the full load set: CPU/datagram + capacity vs a C forwarder and nginx (~12 min, 2 CPUs)
	$(PY) bench/load_bench.py --full

.PHONY: bench-quick
bench-quick: $(BENCH_STAMP) bench-nginx ## load benchmark, 100 B forward path + 10 s RSS (< 2 min): bench/results/quick.json + .png
	$(PY) bench/load_bench.py --quick

.PHONY: bench-reference
bench-reference: $(BENCH_STAMP) bench-nginx ## full load set into bench/reference/, then regenerate the README's performance table
	$(PY) bench/load_bench.py --full --out bench/reference/load.json
	$(PY) bench/report.py

.PHONY: bench-report
bench-report: $(STAMP) ## regenerate the README's performance table from bench/reference/load.json
	$(PY) bench/report.py

.PHONY: clean
clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist *.egg-info

.PHONY: soak
soak: $(STAMP) ## R-21: 30 min of W(1000, 2 s) with a random fault every 30 s (QUICLB_SOAK_SEED replays, QUICLB_SOAK_SECONDS shortens)
	$(VENV)/bin/pytest -m optin -s tests/end_to_end/test_r21_soak.py $(PYTEST_FLAGS)
