"""tetra -> Hugging Face folder -> transformers gives the same logits; sharding, dtype and tied weights survive."""

from __future__ import annotations

import json

import pytest
import torch

from hf_factory import FAMILY_VARIANTS, VOCAB
from tetra.cli import main
from tetra.model.io import load_model, save_hf_model, save_model


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 15), generator=torch.Generator().manual_seed(3))


def _hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(ids).logits, model


@pytest.mark.parametrize("variant", [*FAMILY_VARIANTS, "llama-gqa4-tied", "llama-rope-llama3", "llama-bias-headdim"])
def test_tetra_to_hf_round_trip(variant, hf_folder, tmp_path):
    original, folder = hf_folder(variant)
    model = load_model(folder)
    save_hf_model(model, tmp_path / "out")
    with torch.no_grad():
        expected = original(_ids()).logits
    actual, reloaded = _hf_logits(tmp_path / "out", _ids())
    assert type(reloaded) is type(original)
    assert (actual - expected).abs().max().item() <= 1e-5


def test_sharded_files_both_ways(hf_folder, tmp_path):
    original, folder = hf_folder("llama-gqa2", max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").exists()
    model = load_model(folder)
    shards = save_hf_model(model, tmp_path / "out", max_shard_bytes=40_000)
    written = sorted(p.name for p in shards.iterdir() if p.suffix == ".safetensors")
    assert len(written) > 2 and (shards / "model.safetensors.index.json").exists()
    with torch.no_grad():
        expected = original(_ids()).logits
    actual, _ = _hf_logits(shards, _ids())
    assert torch.equal(actual, expected)
    assert torch.equal(load_model(shards)(_ids()), model(_ids()))


def test_bfloat16_is_preserved(tmp_path):
    from hf_factory import build_hf_model

    original = build_hf_model("qwen2", dtype=torch.bfloat16)
    original.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    save_hf_model(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as tensors:
        assert {tensors.get_tensor(name).dtype for name in tensors.keys()} == {torch.bfloat16}  # noqa: SIM118


def test_tied_embeddings_stay_tied(hf_folder, tmp_path):
    _, folder = hf_folder("qwen2-tied")
    model = load_model(folder)
    assert model.head.weight is model.embed.weight
    save_hf_model(model, tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as tensors:
        assert "lm_head.weight" not in tensors.keys()  # noqa: SIM118
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    _, reloaded = _hf_logits(tmp_path / "out", _ids())
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    save_model(model, tmp_path / "tetra")
    again = load_model(tmp_path / "tetra")
    assert again.head.weight is again.embed.weight
    assert torch.equal(again(_ids()), model(_ids()))


def test_convert_commands_round_trip(hf_folder, tmp_path, capsys):
    original, folder = hf_folder("opt")
    assert main(["convert", "from-hf", str(folder), str(tmp_path / "tetra")]) == 0
    assert (tmp_path / "tetra" / "model_config.json").exists()
    assert main(["convert", "to-hf", str(tmp_path / "tetra"), str(tmp_path / "hf"), "--json"]) == 0
    assert "config.json" in json.loads(capsys.readouterr().out.split("\n", 1)[1])["files"]
    with torch.no_grad():
        expected = original(_ids()).logits
    actual, _ = _hf_logits(tmp_path / "hf", _ids())
    assert (actual - expected).abs().max().item() <= 1e-5
