# Two commands for a new user: `make demo` and `make test`. Each installs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,export,tools,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/adacache-fx demo

test: $(STAMP)
	$(VENV)/bin/ruff check adacache_fx tests examples
	$(PY) -m pytest -q -n 2 --durations=25

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
