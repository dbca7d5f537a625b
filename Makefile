# Two entry points (see README): `make demo` and `make test`. Installs come from the lock, never a fresh resolution.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
LOCK   := requirements/lock.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv demo test test-fast lint lock check-latest clean

venv: $(STAMP)

# A fresh venv holds exactly the lock (every package at an exact version and hash; torch is its CPU build), then
# this checkout as an editable install built with the lock's setuptools. The stamp is written only after an
# import of every entry point succeeds, so a failed or broken install is redone from scratch on the next run.
# Rebuilt when the lock changes: after editing pyproject.toml's dependencies, run `make lock`.
$(STAMP): $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-deps --require-hashes -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e . 2>&1 | { grep -v -E "^\s*$$" || true; }
	$(PY) -m storymaker_serve.envcheck
	touch $(STAMP)

# demo bundle -> export (ONNX, parity, Triton repository) -> real tritonserver -> story over gRPC -> stop
demo: $(STAMP)
	$(PY) -m export.build --demo --out build/demo
	$(PY) -m runtime.client storymaker_serve/examples/demo_story.yaml --serve build/demo/triton_repo --out out/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) out build demo_bundle

# Regenerate the locks from pyproject.toml's ranges (newest versions that fit), with uv. Run the suite after it.
# lock.txt: the CPU install (Python 3.11, Linux x86_64, torch's CPU wheel; the dev and CI venv).
# lock-gpu.txt: the serving image (deploy/Dockerfile: Python 3.12, CUDA torch, onnxruntime-gpu only).
UV_VERSION   := 0.13.9
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
UV_COMPILE    = $(VENV)/bin/uv pip compile pyproject.toml --generate-hashes --python-platform x86_64-manylinux_2_35 \
                --custom-compile-command "make lock" --quiet
lock: $(STAMP)
	$(PIP) install -q uv==$(UV_VERSION)
	$(UV_COMPILE) --python-version 3.11 --extra cpu --extra serve --extra kernel --extra test $(TORCH_SOURCE) \
	    -c requirements/lock-constraints.txt --override requirements/lock-overrides.txt -o $(LOCK)
	$(UV_COMPILE) --python-version 3.12 --extra gpu --extra kernel \
	    -c requirements/lock-gpu-constraints.txt --override requirements/lock-gpu-overrides.txt -o requirements/lock-gpu.txt

# Drift seen before users see it: the newest versions pyproject.toml allows, without the lock, in a throwaway
# venv; a demo build and a served frame; prints what differs from the lock and which package a failure came from.
check-latest:
	$(PYTHON) tools/check_latest.py
