# `make test` and `make demo` do all the set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test install

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first: on the dev/CI machines torch==2.13.0 resolves to a local CPU wheel
# (a plain `torch` would pull a multi-GB CUDA build); on a user's Linux box it is the usual build.
$(STAMP): $(BIN)/python setup.py
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Two workers, a test file each (--dist loadfile keeps a file's module fixtures in one process):
# 3:31 against 5:29 in one process on the 2-core dev machine (BENCHMARKS.md, "make test").
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

.PHONY: demo
# The report's noise-ablation study on the built-in backbone and synthetic data: a sweep of heads x T x 3 seeds,
# a text-blind baseline and the attention probe; mean ± std and computed conclusions (minutes on 2 CPU cores).
demo: $(STAMP)
	$(BIN)/refseg-report demo --out demo-out

.PHONY: docs
# docs/CLI.md from the commands' own --help (tests/test_docs.py fails when it is stale).
docs: $(STAMP)
	$(BIN)/python -m refseg.study.cli_reference > docs/CLI.md
