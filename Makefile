# Every target sets up its own virtual environment (.venv) on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
KACLI  := $(VENV)/bin/kacli
# torch and torchvision are pinned to the builds this project is tested with.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.kacli-installed
DEMO_OUT ?= demo-out

.PHONY: setup demo test test-fast bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(KACLI) demo --out $(DEMO_OUT) --force

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m kacli.bench --out BENCHMARKS.md

# On a CUDA machine: the pipeline at detr-r50 size (AMP, torchrun/NCCL, the GPU step-time ratio) in a
# few minutes, one table; without CUDA it says so and exits 0.
gpu-check: $(STAMP)
	$(PY) -m kacli.bench.gpu_check

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache build *.egg-info
