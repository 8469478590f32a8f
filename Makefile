# `make run` and `make test` work on a fresh clone: both create .venv and install the project first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned to the CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Starts a local Ray cluster on 127.0.0.1, deploys serve/serve_config.yaml, answers one question over gRPC and
# keeps serving on 127.0.0.1:9000 until Ctrl-C.
run: $(STAMP)
	$(PY) -m serve.local

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/model.py

clean:
	rm -rf $(VENV) build *.egg-info
