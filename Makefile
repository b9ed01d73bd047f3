# Every target runs inside a virtual environment in .venv, made on first use.
# On a machine without a GPU, torch is installed first as the CPU build (TORCH_SPEC); on a GPU
# machine, make the venv with your CUDA torch in it first, or pass TORCH_SPEC=torch.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo bench clean gpu-wheels gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { echo "make install: creating the virtual environment $(VENV)"; $(PY) -m venv $(VENV); }
	@$(BIN)/python -c 'import torch' 2>/dev/null || { \
	  echo "make install: installing $(TORCH_SPEC) first (the CPU build on a machine without a GPU)"; \
	  $(BIN)/pip install -q --progress-bar off '$(TORCH_SPEC)'; }
	@echo "make install: installing spanqa and its dependencies (deepspeed, transformers, mlflow, ...; a few minutes)"
	@$(BIN)/pip install -q --progress-bar off -e '.[dev]'
	@touch $@
	@echo "make install: done ($(VENV))"

# The SLURM tier needs a cluster: tests/setup_slurm.sh installs Debian's slurm and munge when it runs
# as root with apt, and otherwise says in one line why those tests will be skipped.
test: install
	@bash tests/setup_slurm.sh
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not slurm"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The whole job on the bundled sample: MiniLM, span head, deepspeed launcher, local MLflow store.
# DEMO_FLAGS are passed to launcher/train.py (a smoke run: DEMO_FLAGS="--max_steps 4 --eval_steps 4").
DEMO_DIR ?= runs/demo
DEMO_FLAGS ?=
demo: install
	$(BIN)/spanqa demo --output_dir $(DEMO_DIR) -- $(DEMO_FLAGS)

# The CPU benchmarks behind the README's results table, each against what it claims to beat
# (about 7 minutes on 2 idle cores; they read ../shared/data/squad2 unless given --data_file/--data).
bench: install
	$(BIN)/python bench/data.py
	$(BIN)/python bench/eval.py
	$(BIN)/python bench/crf.py --repeats 21 --threads 1
	$(BIN)/python bench/train.py
	for head in span crf; do \
	  $(BIN)/python bench/throughput.py --model_config minilm --head $$head --steps 20 --warmup 5 && \
	  $(BIN)/python bench/throughput.py --model_config spanbert-base --head $$head --steps 8 --warmup 2 || exit 1; \
	done

# The GPU check (README, "Proof on a GPU"). gpu-wheels, where pip reaches the index: .wheels/ holds
# every wheel the check needs beyond the CUDA image, and the demo's MiniLM cut to travel (under 60 MB).
# gpu-check, on the GPU machine, with the image's python3: OUT gets the logs and summary.json.
OUT ?= gpu-check
gpu-wheels: install
	$(BIN)/python bench/gpu_wheels.py --out .wheels
gpu-check:
	bash bench/gpu_check.sh $(OUT)

# CI's other legs (.ci/run). `make test` runs the whole suite in .venv, which resolves the newest
# transformers (5.x); these two each make a venv of their own and run what their versions can change:
#   test-tf4     transformers 4.57: the fast tier (models, tokenizers, exports, the QA pipeline), the
#                learning test at one seed per head and two-rank training of each head
#   test-floors  every direct dependency at its floor in pyproject.toml (.ci/lowest_constraints.py;
#                torch 2.7 comes from PyPI, a CUDA build that also runs on CPU): the fast tier, the
#                two-rank training tests (torch, deepspeed: gloo, checkpoints, resume, torchrun) and
#                the MLflow model tests
# What a leg leaves out does not change with its versions: the tf4 leg has torch and deepspeed as in
# .venv, so of the two-rank tests only training itself (not resume, preemption, torchrun), and the
# learning test's second seed checks the heads, not transformers; the floors leg leaves out the
# preemption signal (spanqa's own handler) and torchrun on the launcher script (the same torchrun
# as on -m spanqa.train).
TF4_VENV ?= .venv-tf4
FLOORS_VENV ?= .venv-floors
TF4_SPEC ?= transformers>=4.57,<5
TF4_TRAINING := tests/test_train_learning.py tests/test_train_distributed.py -k "42 or stay_identical"
FLOORS_TRAINING := tests/test_train_distributed.py tests/test_mlflow_model.py \
  -k "not preemption and not launcher-script"

.PHONY: test-tf4 test-floors

$(TF4_VENV)/.installed: pyproject.toml
	test -x $(TF4_VENV)/bin/python || $(PY) -m venv $(TF4_VENV)
	$(TF4_VENV)/bin/python -c 'import torch' 2>/dev/null || $(TF4_VENV)/bin/pip install -q '$(TORCH_SPEC)'
	$(TF4_VENV)/bin/pip install -q -e '.[dev]' '$(TF4_SPEC)'
	touch $@

test-tf4: $(TF4_VENV)/.installed
	$(TF4_VENV)/bin/python -m pytest -m "not slow and not slurm"
	$(TF4_VENV)/bin/python -m pytest $(TF4_TRAINING)

# deepspeed's older sdists import torch while they build: built against the venv's torch 2.7
# (--no-build-isolation) instead of a newest torch pulled into an isolated build environment.
$(FLOORS_VENV)/.installed: pyproject.toml .ci/lowest_constraints.py
	test -x $(FLOORS_VENV)/bin/python || $(PY) -m venv $(FLOORS_VENV)
	$(PY) .ci/lowest_constraints.py > $(FLOORS_VENV)/constraints.txt
	$(FLOORS_VENV)/bin/pip install -q -c $(FLOORS_VENV)/constraints.txt torch 'setuptools>=68' wheel
	$(FLOORS_VENV)/bin/pip install -q --no-build-isolation -c $(FLOORS_VENV)/constraints.txt -e '.[dev]'
	touch $@

test-floors: $(FLOORS_VENV)/.installed
	$(FLOORS_VENV)/bin/python -m pytest -m "not slow and not slurm"
	$(FLOORS_VENV)/bin/python -m pytest $(FLOORS_TRAINING)
