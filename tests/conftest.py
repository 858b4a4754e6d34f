"""Shared fixtures: tiny Hugging Face model folders saved to a temporary directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hf_factory import build_hf_model  # noqa: E402


def pytest_configure(config) -> None:
    """Runs time GEMM layouts and cache them (gemm_layout.py): the tests, and the processes they start, use a
    cache of their own rather than the user's. Likewise for Hugging Face datasets."""
    import os
    import tempfile

    os.environ["TETRA_CACHE_DIR"] = tempfile.mkdtemp(prefix="tetra-test-cache-")
    # lm-eval reads its local task data through Hugging Face datasets: never the network, never the user's cache.
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="tetra-test-datasets-")


@pytest.fixture
def hf_folder(tmp_path: Path):
    """Factory: save a tiny HF model of a variant to a folder; returns (model, folder)."""

    def make(variant: str, seed: int = 0, **save_options):
        model = build_hf_model(variant, seed)
        folder = tmp_path / variant
        model.save_pretrained(folder, **save_options)
        return model, folder

    return make


SAMPLE_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé text: naïve café, 日本語.\n",
    "import os\nimport sys\n\nfor name in os.listdir('.'):\n    print(name, file=sys.stderr)\n",
] * 20


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tetra checkpoint folder: a tiny random Llama with a BPE tokenizer trained on sample text."""
    import torch

    from tetra.data.tokenizer import train_bpe
    from tetra.model import ModelConfig, Transformer
    from tetra.model.io import save_model

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = train_bpe(SAMPLE_TEXT, vocab_size=400)
    tokenizer.save(root / "tokenizer")
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(std=0.3)  # large weights: peaked, varied predictions instead of near-uniform noise
    return save_model(model, root / "checkpoint", tokenizer_from=root / "tokenizer")


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> Path:
    """A .jsonl corpus of 120 short, varied documents."""
    import json

    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    lines = [json.dumps({"text": f"{SAMPLE_TEXT[i % 3]} document {i}: " + "x = " + str(i * 7919 % 1000) * (i % 5 + 1)})
             for i in range(120)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, corpus_jsonl) -> Path:
    """corpus_jsonl tokenized with a 400-token BPE, 10% held out."""
    from tetra.data.prepare import prepare_data
    from tetra.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("prepared")
    train_bpe(SAMPLE_TEXT, vocab_size=400).save(root / "tokenizer")
    prepare_data(str(corpus_jsonl), root / "tokenizer", root / "data", val_fraction=0.1, show_progress=False)
    return root / "data"
