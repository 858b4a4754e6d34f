"""Tokenizers: trained BPE folders load in transformers' AutoTokenizer with identical ids; chat templates render."""

from __future__ import annotations

import pytest

from conftest import SAMPLE_TEXT
from tetra.cli import main
from tetra.data.tokenizer import TextTokenizer, train_bpe
from tetra.errors import DataError

TEXTS = ["def add(a, b):\n    return a + b", "naïve café 日本語 🙂", "  leading spaces\ttabs\n\n", "<|endoftext|>after"]


def test_trained_tokenizer_matches_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = train_bpe(SAMPLE_TEXT, vocab_size=350)
    tokenizer.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    reloaded = TextTokenizer.load(tmp_path)
    for text in TEXTS:
        ids = reloaded.encode(text)
        assert ids == hf(text)["input_ids"]
        assert reloaded.decode(ids, skip_special_tokens=False) == text
    assert hf.eos_token == "<|endoftext|>" and reloaded.eos_id == hf.eos_token_id
    assert reloaded.pad_id == hf.pad_token_id
    assert reloaded.vocab_size == 350


def test_training_is_deterministic():
    first, second = train_bpe(SAMPLE_TEXT, 350), train_bpe(SAMPLE_TEXT, 350)
    assert first.backend.to_str() == second.backend.to_str()
    assert first.fingerprint() == second.fingerprint()


def test_chat_template_renders_like_transformers(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = train_bpe(SAMPLE_TEXT, vocab_size=350)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.save(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False,
                                                                           add_generation_prompt=True)
    assert TextTokenizer.load(tmp_path).apply_chat_template(messages) == expected


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="tokenizer.json does not exist.*tetra tokenizer train"):
        TextTokenizer.load(tmp_path)


def test_tokenizer_train_command(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index, text in enumerate(SAMPLE_TEXT[:3]):
        (corpus / f"doc{index}.txt").write_text(text * 5)
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "320", "--out", str(tmp_path / "tok")]) == 0
    assert TextTokenizer.load(tmp_path / "tok").vocab_size == 320
    assert "3 documents" in capsys.readouterr().out
