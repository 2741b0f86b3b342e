# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint mutate

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/swapmoe generate --memory-budget 50% --prompt "Once upon a time there was a king who" --max-new-tokens 64

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts benchmarks

test: $(STAMP) lint
	$(VENV)/bin/python -m pytest -q

# Mutation check (scripts/mutate.py): one-line breaks of Eq. 1, the policy, Masked Gating and the
# scheduler, each applied to a temporary copy of the tree; every one must turn its tests red.
mutate: $(STAMP)
	$(VENV)/bin/python scripts/mutate.py
