# Two commands do all the set-up on a fresh machine:
#   make demo   installs the engine into .venv and runs it end to end on generated demo data:
#               a store, its report, the example playbooks checked, backtested over the
#               last twelve weeks (dryrun-report.html), run, and the queue they produced
#   make test   installs the test tools too and runs ruff, mypy and the test suite
PYTHON ?= $(shell for p in python3.12 python3.11 python3; do \
	if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 13)))' 2>/dev/null; then \
	echo $$p; break; fi; done)
VENV := .venv
BIN := $(VENV)/bin
DEMO_DB ?= demo.db

.PHONY: demo test lint bench clean

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "Python 3.11 or 3.12 is required (durable-rules does not import on 3.13)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

demo: $(VENV)/.installed
	$(BIN)/playbook demo --db $(DEMO_DB) --replace
	$(BIN)/playbook validate playbooks
	$(BIN)/playbook dry-run playbooks --db $(DEMO_DB) --from today-14w --to today-2w --every 7d \
		--html dryrun-report.html
	$(BIN)/playbook run playbooks --db $(DEMO_DB)
	rm -rf demo-export && mkdir demo-export
	$(BIN)/playbook export --db $(DEMO_DB) --to wecom -o demo-export/wecom.jsonl --now today+34h
	$(BIN)/playbook export --db $(DEMO_DB) --to tasks -o demo-export/tasks --now today+34h
	$(BIN)/playbook export --db $(DEMO_DB) --to csv -o demo-export/other.csv --now today+34h
	$(BIN)/playbook queue --db $(DEMO_DB) --summary

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

bench: $(VENV)/.installed-test
	$(BIN)/python bench/features.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/run.py
	$(BIN)/python bench/dryrun.py
	$(BIN)/python bench/export.py

clean:
	rm -rf $(VENV) $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm dryrun-report.html .pytest_cache \
		.mypy_cache .ruff_cache
