"""Recurrent depth: a fixed r and initial state are deterministic, the truncated backward equals autograd through
the last k iterations, cached decoding equals a full recompute at several r, adaptive exit stops no later than the
fixed r, the training sampler's draws, training and exact resume from the command line, and bad settings."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tetra.cli import main
from tetra.errors import ConfigError
from tetra.infer.recurrence import recurrence_settings
from tetra.model import ModelConfig, Transformer
from tetra.model.kv_cache import KVCache
from tetra.train.recurrence import sample_recurrence

SHAPE = dict(vocab_size=40, hidden_size=32, n_layers=4, n_heads=4, recurrent_prelude=1, recurrent_core=2,
             recurrent_coda=1, mean_recurrence=4, backprop_depth=2)


def _model(**changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**SHAPE, **changes}))
    model.init_weights(0.2)
    return model


def _ids(length: int = 10) -> torch.Tensor:
    return torch.randint(0, 40, (2, length), generator=torch.Generator().manual_seed(1))


def test_a_fixed_r_and_initial_state_are_deterministic():
    model = _model()
    ids = _ids()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, recurrence=5), model(ids, recurrence=5))
        assert not torch.allclose(model(ids, recurrence=5), model(ids, recurrence=2))
    model.train()
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)  # the random initial state comes from the global generator
        outputs.append(model(ids, recurrence=5))
    assert torch.equal(*outputs)


def _reference_loss(model: Transformer, ids: torch.Tensor, steps: int, depth: int) -> torch.Tensor:
    """The same forward written out with full autograd, cut (detached) before the last `depth` iterations."""
    blocks, recurrence = model.blocks, model.recurrence
    rotary = model.rotary(torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1), torch.float32)
    x = blocks[0](model.embed(ids), rotary, None)
    state = torch.zeros_like(x)
    for step in range(steps):
        early = step < steps - depth
        injected = x.detach() if early else x
        state = recurrence.state(state) + recurrence.inject(injected)
        for block in blocks[1:3]:
            state = block(state, rotary, None)
        if early:
            state = state.detach()
    out = blocks[3](state, rotary, None)
    return model.head(model.norm(out)).square().mean()


@pytest.mark.parametrize(("steps", "depth"), [(5, 2), (3, 3), (6, 1)])
def test_truncated_backward_equals_autograd_through_the_last_k_iterations(steps, depth):
    model = _model(backprop_depth=depth, mean_recurrence=max(depth, 4)).eval()  # eval: s_0 = 0 on both sides
    ids = _ids()
    model(ids, recurrence=steps).square().mean().backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    _reference_loss(model, ids, steps, depth).backward()
    reference = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert sorted(ours) == sorted(reference)
    for name, grad in reference.items():
        assert torch.allclose(ours[name], grad, atol=1e-6), name


@pytest.mark.parametrize("steps", [1, 3, 6])
def test_cached_decoding_equals_a_full_recompute(steps):
    model = _model(recurrent_cache_slots=6).eval()
    ids = _ids()
    with torch.no_grad():
        full = model(ids, recurrence=steps)
        cache = KVCache(model.config, 2, ids.shape[1], torch.float32, "cpu")
        pieces = [model(ids[:, :4], kv_cache=cache, recurrence=steps)]
        pieces += [model(ids[:, t:t + 1], kv_cache=cache, cache_start=t, recurrence=steps) for t in range(4, 10)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_one_cache_slot_keeps_the_cache_from_growing_with_r():
    model = _model().eval()  # recurrent_cache_slots = 1, the default
    cache = KVCache(model.config, 2, 10, torch.float32, "cpu")
    assert cache.keys.shape[0] == model.config.n_layers
    ids = _ids()
    with torch.no_grad():
        full = model(ids, recurrence=8)
        model(ids[:, :9], kv_cache=cache, recurrence=8)
        last = model(ids[:, 9:], kv_cache=cache, cache_start=9, recurrence=8)
    # the last token now sees the earlier tokens' keys from their final iteration only: close, not equal
    assert torch.isfinite(last).all() and not torch.allclose(last, full[:, 9:], atol=1e-6)


def test_adaptive_exit_stops_no_later_than_the_fixed_r():
    model = _model().eval()
    ids = _ids()
    with torch.no_grad():
        stats: dict = {}
        fixed = model(ids, recurrence=12, stats=stats)
        assert stats["steps"] == 12
        assert torch.equal(model(ids, recurrence=12, exit_kl=1e-30, stats=stats), fixed)
        for threshold in (1e-2, 1.0, 1e9):
            model(ids, recurrence=12, exit_kl=threshold, stats=stats)
            assert 2 <= stats["steps"] <= 12
        assert stats["steps"] == 2  # with an enormous threshold the second iteration already agrees


def test_the_sampler_draws_a_heavy_tailed_r_around_the_mean():
    torch.manual_seed(0)
    draws = [sample_recurrence(8) for _ in range(4000)]
    assert min(draws) >= 1 and 8.5 < sum(draws) / len(draws) < 9.5  # E[r] = mean + 1
    assert max(draws) > 18
    torch.manual_seed(0)
    assert [sample_recurrence(8) for _ in range(20)] == draws[:20]


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="backprop_depth = 9 must be in 1 .. mean_recurrence"):
        ModelConfig(**{**SHAPE, "backprop_depth": 9}).validate()
    with pytest.raises(ConfigError, match="n_layers = recurrent_prelude"):
        ModelConfig(**{**SHAPE, "n_layers": 5}).validate()
    plain = Transformer(ModelConfig(vocab_size=40, hidden_size=32, n_heads=4))
    with pytest.raises(ConfigError, match="recurrent-depth models"), recurrence_settings(plain, 4):
        pass


def test_training_resumes_exactly_and_generation_takes_any_r(prepared_data, tmp_path, capsys):
    config = tmp_path / "run.toml"
    model = "".join(f"{key} = {value}\n" for key, value in SHAPE.items() if key != "vocab_size")
    config.write_text(f'[data]\npath = "{prepared_data}"\nseq_len = 16\n[model]\n{model}[train]\nmax_steps = 4\n'
                      f'batch_size = 2\nwarmup_steps = 1\nprecision = "fp32"\n[eval]\nevery = 0\n'
                      f'[run]\ndir = "{tmp_path / "run"}"\nlog_every = 1\ncheckpoint_every = 2\n')
    assert main(["train", str(config), "--no-progress"]) == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    first = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000004")
    assert main(["train", str(config), "--resume", "auto", "--no-progress"]) == 0
    assert [json.loads(line)["loss"] for line in metrics.read_text().splitlines()] == first
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000004"
    capsys.readouterr()
    assert main(["generate", str(checkpoint), "--prompt", "def", "--max-new-tokens", "3", "--temperature", "0",
                 "--recurrence", "7", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["recurrence"]["iterations"]) == {7}
    assert main(["generate", str(checkpoint), "--prompt", "def", "--max-new-tokens", "3", "--recurrence", "9",
                 "--exit-kl", "1e9", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["recurrence"]["iterations"]) == {2}
    assert main(["generate", str(checkpoint), "--prompt", "def", "--recurrence", "0"]) == 2


def test_recurrent_depth_on_grids_equals_one_process():
    """Sandwich norms, the adapter and truncated backprop split over row, col, depth and data (two ranks), and
    row x col, depth x col (four): loss, gradients, global norm and parameters after 4 steps at r = 3, 5, 1, 4."""
    from recurrence_grid_worker import check_recurrence_grids
    from tetra.parallel.launch import spawn_collect

    results = spawn_collect(check_recurrence_grids, 2, [dict(row=2), dict(col=2), dict(depth=2), dict(data=2)])
    results += spawn_collect(check_recurrence_grids, 4, [dict(row=2, col=2), dict(depth=2, col=2)])
    assert [r["random_state"] for r in results] == [True, True, False, False, True, False]
    for result in results:
        assert result["grad_names_match"], result["grid"]
        for key in ("loss_error", "grad_error", "norm_error", "param_error"):
            assert result[key] <= 1e-5, f"{result['grid']}: {key} = {result[key]:.2e}"


def test_adaptive_exit_is_per_sequence_and_a_batch_equals_each_row_alone():
    """Rows of one batch exit at their own iteration; each row's logits, iterations and cached decoding equal the
    row decoded alone."""
    model = _model().eval()
    ids = torch.randint(0, 40, (3, 8), generator=torch.Generator().manual_seed(4))
    threshold = None
    with torch.no_grad():
        for candidate in (1.0, 0.5, 2.0, 0.3, 3.0, 0.1):  # an untrained model moves a lot per iteration
            stats: dict = {}
            model(ids, recurrence=16, exit_kl=candidate, stats=stats)
            if len(set(stats["row_steps"])) > 1:
                threshold = candidate
                break
        assert threshold is not None, "no threshold separated the rows"

        def decode(rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
            cache = KVCache(model.config, rows.shape[0], 8, torch.float32, "cpu")
            stats: dict = {}
            pieces = [model(rows[:, :5], kv_cache=cache, recurrence=16, exit_kl=threshold, stats=stats)]
            steps = list(stats["row_steps"])
            for t in range(5, 8):
                pieces.append(model(rows[:, t:t + 1], kv_cache=cache, cache_start=t, recurrence=16,
                                    exit_kl=threshold, stats=stats))
                steps += stats["row_steps"]
            return torch.cat(pieces, 1), steps

        together, together_steps = decode(ids)
        for row in range(3):
            alone, alone_steps = decode(ids[row:row + 1])
            assert torch.allclose(together[row:row + 1], alone, atol=1e-5), row
            assert together_steps[row::3] == alone_steps
    assert max(together_steps) <= 16
