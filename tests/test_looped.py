"""Looped transformers (model.loop): one pass equals the plain stack, R passes equal the stack written out R times
with the input added before each, cached decoding equals a full recompute, the progressive loss mixes the full and a
truncated loop exactly as written out, training resumes exactly, and bad settings are named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tetra.cli import main
from tetra.errors import ConfigError
from tetra.model import ModelConfig, Transformer
from tetra.model.kv_cache import KVCache
from tetra.train.progressive import ProgressiveLoss

SHAPE = dict(vocab_size=40, hidden_size=32, n_layers=2, n_heads=4)


def _model(**changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**SHAPE, **changes}))
    model.init_weights(0.2)
    return model


def _ids(length: int = 10) -> torch.Tensor:
    return torch.randint(0, 40, (2, length), generator=torch.Generator().manual_seed(1))


def _written_out(model: Transformer, ids: torch.Tensor, passes: int, tracked: int | None = None) -> torch.Tensor:
    """The looped forward by hand: s = blocks(s + e) `passes` times from s = 0, gradient through the last `tracked`."""
    rotary = model.rotary(torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1), torch.float32)
    embedded = model.embed(ids)
    state = torch.zeros_like(embedded)
    tracked = passes if tracked is None else tracked
    for step in range(passes):
        early = step < passes - tracked
        state = state + (embedded.detach() if early else embedded)
        for block in model.blocks:
            state = block(state, rotary, None)
        if early:
            state = state.detach()
    return model.head(model.norm(state))


def test_one_pass_equals_the_plain_stack():
    looped, plain = _model(loop=1), _model()
    plain.load_state_dict(looped.state_dict())
    ids = _ids()
    assert torch.equal(looped(ids), plain(ids))
    assert looped.config.num_parameters() == plain.config.num_parameters()


@pytest.mark.parametrize("passes", [2, 3])
def test_r_passes_equal_the_stack_written_out_with_input_injection(passes):
    model = _model(loop=passes)
    ids = _ids()
    assert torch.allclose(model(ids), _written_out(model, ids, passes), atol=1e-6)
    assert torch.allclose(model(ids, recurrence=5), _written_out(model, ids, 5), atol=1e-6)  # more at test time


@pytest.mark.parametrize("passes", [1, 3])
def test_cached_decoding_equals_a_full_recompute(passes):
    model = _model(loop=passes).eval()
    assert model.config.cache_layers == 2 * passes
    ids = _ids()
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, ids.shape[1], torch.float32, "cpu")
        pieces = [model(ids[:, :4], kv_cache=cache)]
        pieces += [model(ids[:, t:t + 1], kv_cache=cache, cache_start=t) for t in range(4, 10)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_the_progressive_loss_is_the_full_and_the_truncated_loop_mixed():
    model, ids, alpha = _model(loop=4), _ids(), 0.3
    torch.manual_seed(5)
    without, tracked = ProgressiveLoss(model, alpha).draw()
    torch.manual_seed(5)
    mixed = ProgressiveLoss(model, alpha)(lambda: model(ids).square().mean(-1))
    mixed.sum().backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    reference = (1 - alpha) * _written_out(model, ids, 4).square().mean(-1) + \
        alpha * _written_out(model, ids, without + tracked, tracked).square().mean(-1)
    assert torch.allclose(mixed, reference, atol=1e-6)
    reference.sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(ours[name], p.grad, atol=1e-6), name
    draws = []
    for _ in range(400):
        draws.append(ProgressiveLoss(model, alpha).draw())
    assert {n for n, _ in draws} == {0, 1, 2, 3} and all(1 <= k <= 4 - n for n, k in draws)


def _train(tmp_path, data, name: str, extra: list[str]) -> list[float]:
    config = tmp_path / "looped.toml"
    config.write_text(f'[data]\npath = "{data}"\nseq_len = 32\n[model]\nhidden_size = 32\nn_layers = 1\n'
                      'n_heads = 2\nloop = 3\n[train]\nmax_steps = 4\nbatch_size = 4\nwarmup_steps = 1\n'
                      'progressive_loss = 0.5\nprecision = "fp32"\n[eval]\nevery = 0\n'
                      f'[run]\ndir = "{tmp_path / name}"\nlog_every = 1\ncheckpoint_every = 2\n')
    assert main(["train", str(config), "--no-progress", *extra]) == 0
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def test_training_with_the_progressive_loss_resumes_exactly(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "arithmetic", "--op", "add", "--max-digits", "3", "--examples", "300", "--out",
                 str(data)]) == 0
    whole = _train(tmp_path, data, "whole", [])
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")  # as if stopped after the step-2 checkpoint
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000004")
    resumed = _train(tmp_path, data, "cut", ["--resume", "auto"])
    assert resumed == whole and len(whole) == 4
    capsys.readouterr()
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-0000004"
    assert main(["generate", str(checkpoint), "--prompt", "12+3=", "--max-new-tokens", "3", "--recurrence", "6",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recurrence"]["iterations"][0] == 6


def test_bad_settings_are_named(tmp_path, capsys):
    with pytest.raises(ConfigError, match="model.loop"):
        ModelConfig(**SHAPE, loop=-1).validate()
    with pytest.raises(ConfigError, match="choose one of the two"):
        ModelConfig(**{**SHAPE, "n_layers": 3}, loop=2, recurrent_prelude=1, recurrent_core=1,
                    recurrent_coda=1, mean_recurrence=2, backprop_depth=1).validate()
    data = tmp_path / "data"
    assert main(["data", "arithmetic", "--max-digits", "2", "--examples", "100", "--out", str(data)]) == 0
    config = tmp_path / "plain.toml"
    config.write_text(f'[data]\npath = "{data}"\nseq_len = 32\n[model]\nhidden_size = 16\nn_layers = 1\n'
                      'n_heads = 2\n[train]\nmax_steps = 1\nbatch_size = 2\nwarmup_steps = 0\n'
                      f'progressive_loss = 0.5\n[eval]\nevery = 0\n[run]\ndir = "{tmp_path / "run"}"\n')
    capsys.readouterr()
    assert main(["train", str(config), "--no-progress"]) == 2
    assert "model.loop" in capsys.readouterr().err
    assert main(["train", str(config), "--no-progress", "train.progressive_loss=1.5"]) == 2
    assert "train.progressive_loss must be in [0, 1]" in capsys.readouterr().err


def test_a_looped_stack_on_grids_equals_one_process():
    """The loop (input injection, gradient through the last two passes) on row, col and depth x col grids: loss,
    gradients, global norm and parameters after 4 AdamW steps at R = 3, 5, 1, 4."""
    from recurrence_grid_worker import check_recurrence_grids
    from tetra.parallel.launch import spawn_collect

    results = spawn_collect(check_recurrence_grids, 2, [dict(row=2, loop=3), dict(col=2, loop=3)])
    results += spawn_collect(check_recurrence_grids, 4, [dict(depth=2, col=2, loop=3)])
    for result in results:
        assert result["loop"] == 3 and result["grad_names_match"], result["grid"]
        for key in ("loss_error", "grad_error", "norm_error", "param_error"):
            assert result[key] <= 1e-5, f"{result['grid']}: {key} = {result[key]:.2e}"
