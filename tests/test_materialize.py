"""Models larger than one process: built on the meta device, split over the grid, and given only this rank's
pieces (drawn by the tiled initializer or read from a checkpoint's slices) equal the whole model built and split,
bit for bit, on several grids and from every checkpoint kind and family (tied and untied heads)."""

from __future__ import annotations

import pytest
import torch

from hf_factory import save_hf_folder
from materialize_worker import check_materialize
from tetra.model import ModelConfig, Transformer
from tetra.model.initialization import TILE, InitRule, draw_region
from tetra.model.io import load_model, save_model
from tetra.parallel.launch import spawn_collect


def _assert_all_equal(results: list[dict]) -> None:
    for result in results:
        label = f"{result['source']} {result['grid']} {result['layout']}"
        assert not result["different"] and not result["meta"] and not result["over_read"], f"{label}: {result}"
        assert result["problems_on_all_ranks"] == 0, f"{label}: another rank differs"


def test_regions_are_the_same_numbers_as_the_whole_tensor():
    rule = InitRule("normal", 0.5)
    shape = (TILE + 37, 2 * TILE + 5)
    whole = draw_region(rule, "w", shape, ((0, shape[0]), (0, shape[1])), seed=3)
    for rows, cols in [((0, 1), (0, shape[1])), ((TILE - 3, TILE + 9), (TILE + 1, 2 * TILE + 5)),
                       ((shape[0] - 1, shape[0]), (7, 8))]:
        assert torch.equal(draw_region(rule, "w", shape, (rows, cols), seed=3), whole[slice(*rows), slice(*cols)])
    assert not torch.equal(draw_region(rule, "v", shape, ((0, 4), (0, 4)), seed=3), whole[:4, :4])  # per name
    assert not torch.equal(draw_region(rule, "w", shape, ((0, 4), (0, 4)), seed=4), whole[:4, :4])  # per seed
    assert abs(float(whole.std()) - 0.5) < 0.01


def test_init_weights_follows_the_seed_not_the_global_generator():
    config = ModelConfig(vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, intermediate_size=48)
    first, second = Transformer(config), Transformer(config)
    first.init_weights(0.1, seed=5)
    torch.manual_seed(123)
    second.init_weights(0.1, seed=5)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    attention = first.blocks[0].attn
    assert float(attention.o.weight.detach().std()) < float(attention.q.weight.detach().std())  # residual scale
    assert torch.equal(first.blocks[0].attn_norm.weight, torch.ones(32))


def test_random_init_on_the_meta_device_equals_one_process_two_ranks():
    cases = [("llama", dict(depth=2)), ("gpt2", dict(row=2)), ("odd", dict(depth=2), "in_out"),
             ("abacus", dict(col=2)), ("gpt2", dict(depth=2), "in_out")]
    _assert_all_equal(spawn_collect(check_materialize, 2, cases))


def test_sharded_loading_equals_loading_whole_then_splitting_four_ranks(tmp_path):
    pytest.importorskip("transformers")
    # untied: llama-gqa2, qwen2, mistral; tied: llama-gqa4-tied, gpt2 (fused, transposed Conv1D), opt
    folders = {variant: save_hf_folder(tmp_path / variant, variant)
               for variant in ("llama-gqa2", "llama-gqa4-tied", "qwen2", "mistral", "gpt2", "opt")}
    tetra_checkpoint = str(save_model(load_model(folders["gpt2"], dtype=torch.float32), tmp_path / "tetra"))
    grids = [dict(row=2, col=2), dict(depth=2, row=2), dict(data=2, depth=2)]
    cases = [(folder, grid) for folder in folders.values() for grid in grids[:2]]
    cases += [(folders["gpt2"], grids[1], "in_out"), (folders["llama-gqa2"], dict(depth=2, col=2), "in_out"),
              (folders["opt"], grids[2]), (tetra_checkpoint, grids[0]), (tetra_checkpoint, dict(depth=4), "in_out")]
    _assert_all_equal(spawn_collect(check_materialize, 4, cases))


def test_gguf_loads_piece_by_piece(tmp_path):
    pytest.importorskip("gguf")
    from conftest import SAMPLE_TEXT
    from gguf_factory import tiny_hf_model, write_gguf
    from tetra.data.gguf_tokenizer import load_tokenizer
    from tetra.data.tokenizer import train_bpe

    train_bpe(SAMPLE_TEXT, vocab_size=400).save(tmp_path / "tokenizer")
    vocab = load_tokenizer(tmp_path / "tokenizer").vocab_size
    path = write_gguf(tiny_hf_model("llama", vocab), tmp_path / "tokenizer", tmp_path / "model.gguf", "Q8_0")
    _assert_all_equal(spawn_collect(check_materialize, 2, [(str(path), dict(col=2)), (str(path), dict(depth=2))]))
