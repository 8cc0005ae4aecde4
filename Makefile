# The two commands: `make demo` and `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mlkit-installed
SYNC_MSG := notebooks and library are out of sync: edit nbs/, run nbdev-export (and make readme), commit both
TRACKED := find nbs mlkit README.md -type f ! -path '*/__pycache__/*' ! -path '*/.ipynb_checkpoints/*' -print0 | sort -z | xargs -0 sha256sum

.PHONY: demo test install test-deps sync-check clean-check export-check readme nbtest pytest bench lab test-airflow airflow-venv test-seeds test-demo test-kit

## (re)install when .venv is missing or pyproject.toml / constraints.txt changed (by content)
install:
	@want="$$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-64)"; \
	if [ -x $(BIN)/python ] && [ "$$(cat $(STAMP) 2>/dev/null)" = "$$want" ]; then exit 0; fi; \
	set -e; test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	echo "installing mlkit and its dependencies into $(VENV)"; \
	$(BIN)/python -m pip install --quiet --upgrade pip; \
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"; \
	echo "$$want" > $(STAMP)

demo: install
	$(BIN)/mlkit demo

test: install test-deps sync-check nbtest pytest

## nbdev-clean must change nothing; nbdev-export and the README must match the notebooks
sync-check: clean-check export-check

clean-check:
	@before="$$($(TRACKED))"; $(BIN)/nbdev-clean; after="$$($(TRACKED))"; \
	if [ "$$before" != "$$after" ]; then echo "notebooks are not clean: run nbdev-clean and commit the result" >&2; exit 1; fi

export-check:
	@before="$$($(TRACKED))"; $(BIN)/nbdev-export && $(MAKE) --no-print-directory readme >/dev/null; after="$$($(TRACKED))"; \
	if [ "$$before" != "$$after" ]; then echo "$(SYNC_MSG)" >&2; diff <(echo "$$before") <(echo "$$after") | grep '^>' | sed 's/^> [0-9a-f]* */  changed: /' >&2; exit 1; fi

## README.md is generated from nbs/index.ipynb (nbdev's own readme needs Quarto)
readme:
	$(BIN)/jupyter nbconvert --log-level=ERROR --to markdown --output-dir . --output README nbs/index.ipynb

nbtest:
	$(BIN)/nbdev-test

## what the tests need beyond Python, as Debian packages: Chromium (the report test opens report.html headless)
## and PostgreSQL's server (the prediction log and registry tests start a throwaway one on 127.0.0.1)
test-deps:
	@need=""; command -v chromium >/dev/null || need="$$need chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need="$$need postgresql"; \
	if [ -n "$$need" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "the tests need Debian packages:$$need (sudo apt-get install$$need)" >&2; exit 1; fi; \
	  echo "installing Debian packages for the tests:$$need"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$need >/dev/null; \
	fi

pytest:
	$(BIN)/pytest

## the exported DAG loaded by Airflow's DagBag and one task run for real, in a separate venv (Airflow is no dependency of mlkit);
## the venv is cached in AIRFLOW_VENV and rebuilt when tests/airflow/requirements.txt or constraints.txt change (by content)
AIRFLOW_VENV ?= $(HOME)/.cache/mlkit/airflow-venv
AIRFLOW_REQS := tests/airflow/requirements.txt tests/airflow/constraints.txt

airflow-venv:
	@want="$$(cat $(AIRFLOW_REQS) | sha256sum | cut -c1-64)"; \
	if [ -x $(AIRFLOW_VENV)/bin/airflow ] && [ "$$(cat $(AIRFLOW_VENV)/.mlkit-airflow-installed 2>/dev/null)" = "$$want" ]; then exit 0; fi; \
	set -e; rm -rf $(AIRFLOW_VENV); $(PYTHON) -m venv $(AIRFLOW_VENV); \
	echo "installing Airflow for the DAG test into $(AIRFLOW_VENV)"; \
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --upgrade pip; \
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet -c tests/airflow/constraints.txt -r tests/airflow/requirements.txt; \
	echo "$$want" > $(AIRFLOW_VENV)/.mlkit-airflow-installed

test-airflow: install airflow-venv
	AIRFLOW_TEST_PYTHON=$(AIRFLOW_VENV)/bin/python $(BIN)/pytest -q -p no:cacheprovider tests/airflow

bench: install
	@command -v wrk >/dev/null || apt-get install -y -q wrk >/dev/null || { echo "bench/serve.py needs wrk (apt-get install wrk)"; exit 1; }
	@for b in retrain serve predlog monitor gatekeeper; do echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || exit 1; done

lab: install
	$(BIN)/jupyter lab --ip 127.0.0.1 --no-browser

## the poisoning checks and the gate over ten seeds per task (binary, multiclass, regression): minutes, so not in `make test`
test-seeds: install
	MLKIT_SEED_TESTS=1 $(BIN)/pytest -q -s -p no:cacheprovider tests/seeds

## `make demo` end to end in a scratch copy of the project (the tour's output checked step by step): minutes, so not in `make test`
test-demo: install
	MLKIT_DEMO_TEST=1 $(BIN)/pytest -q -p no:cacheprovider tests/demo

## `mlkit new` on a binary, a multiclass and a regression table, then each new project's own `make test` and `make demo`
## (each makes its own venv from the pip cache): minutes, so not in `make test`
test-kit: install
	MLKIT_KIT_TEST=1 $(BIN)/pytest -q -p no:cacheprovider tests/kit
