# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# Exact versions the tests ran with (torch apart: install the build that fits the machine first).
# `make lock` rewrites it from the newest releases pyproject.toml allows; run `make test` after it.
LOCK := requirements/lock.txt
TORCH_CPU := torch==2.13.0

.PHONY: setup demo test lint lock test-latest mutate

$(STAMP): pyproject.toml $(LOCK)
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/pip install -q $(TORCH_CPU)
	$(VENV)/bin/pip install -q -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

# A fresh resolution in a throw-away venv, so that nothing installed by hand leaks into the lock.
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q $(TORCH_CPU)
	.venv-lock/bin/pip install -q -e ".[dev]"
	{ echo "# Written by 'make lock' (pip freeze of a fresh venv; torch is installed apart). Do not edit."; \
	  .venv-lock/bin/pip freeze --exclude-editable --exclude torch; } > $(LOCK)
	rm -rf .venv-lock

# The suite against the newest releases the registry serves (no lock): what a plain `pip install`
# gets a new user tomorrow. Record the result in docs/families.md.
test-latest:
	test -x .venv-latest/bin/python || $(PY) -m venv .venv-latest
	.venv-latest/bin/python -c "import torch" 2>/dev/null || .venv-latest/bin/pip install -q $(TORCH_CPU)
	.venv-latest/bin/pip install -q -U --upgrade-strategy eager -e ".[dev]"
	.venv-latest/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider

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
