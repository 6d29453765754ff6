# Two entry points, both safe on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= $(wildcard config.toml)

.PHONY: setup run test bench bench-gpu clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: pip takes the CPU build from the machine's disk instead of a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/facechain-bot run $(if $(CONFIG),--config $(CONFIG))

test: setup
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The benches that finish on a CPU; bench_generate and bench_tryon time full-size jobs on a GPU
# (bench/gpu_check.sh runs them there, with tests/test_gpu.py).
CPU_BENCHES := scheduler portrait_overhead lora_switch train_step train_sdxl enhance talk studio faults ray fast duo

bench: setup
	for b in $(CPU_BENCHES); do $(PY) bench/bench_$$b.py || exit 1; done

bench-gpu: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache
