# Two commands for a fresh machine: `make demo` and `make test`. Everything lives in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo

.PHONY: install demo test lint bench clean

$(BIN)/tetra: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(BIN)/tetra

install: $(BIN)/tetra

# A tokenizer trained on the Python standard library, a tiny model, sampling, and a Hugging Face export.
demo: install
	$(BIN)/tetra tokenizer train stdlib --vocab-size 4096 --out $(DEMO)/tokenizer --overwrite
	$(BIN)/tetra init --preset tiny --tokenizer $(DEMO)/tokenizer --out $(DEMO)/checkpoint --overwrite
	$(BIN)/tetra generate $(DEMO)/checkpoint --prompt "def main(" --max-new-tokens 40 --seed 0
	$(BIN)/tetra convert to-hf $(DEMO)/checkpoint $(DEMO)/hf --overwrite

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/generate_throughput.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
