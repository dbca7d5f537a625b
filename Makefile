# Two entry points (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv demo test clean

venv: $(STAMP)

# torch is pinned and installed first (CPU wheel); every later install is constrained.
$(STAMP): requirements/constraints.txt requirements/core.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c requirements/constraints.txt -r requirements/core.txt
	$(PIP) install -q -c requirements/constraints.txt --no-deps -e .
	touch $(STAMP)

# demo bundle -> export (ONNX, parity, Triton repository) -> real tritonserver -> story over gRPC -> stop
demo: $(STAMP)
	$(PY) -m export.build --demo --out build/demo
	$(PY) -m runtime.client examples/demo_story.yaml --serve build/demo/triton_repo --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) out build demo_bundle
