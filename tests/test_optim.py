"""Optimizer groups, learning-rate schedules, and the equivalences the loop relies on."""

from __future__ import annotations

import pytest
import torch

from tetra.config import TrainConfig
from tetra.model import ModelConfig, Transformer
from tetra.train.losses import next_token_loss
from tetra.train.optim import lr_at, parameter_groups
from tetra.train.setup import enable_activation_checkpointing


def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    values = dict(vocab_size=50, hidden_size=32, n_layers=2, n_heads=4, intermediate_size=48, **overrides)
    model = Transformer(ModelConfig(**values))
    model.init_weights()
    return model


def test_weight_decay_only_on_linear_matrices():
    model = _model(norm="layernorm", qkv_bias=True, tie_embeddings=True)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {n for n, _ in model.named_parameters()
                       if n.endswith(".weight") and (".attn." in n or ".mlp." in n)}
    assert "embed.weight" in {names[id(p)] for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "linear", "constant"])
def test_schedules_warm_up_then_end_at_their_floor(schedule):
    config = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110, schedule=schedule,
                         decay_fraction=0.2)
    rates = [lr_at(step, config) for step in range(110)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in zip(rates[:10], rates[1:10], strict=False))
    assert all(a >= b - 1e-12 for a, b in zip(rates[10:], rates[11:], strict=False))  # never rises after warmup
    expected_end = 1.0 if schedule == "constant" else 0.1
    assert lr_at(110, config) == pytest.approx(expected_end)
    if schedule == "wsd":
        assert rates[90] == pytest.approx(1.0) and rates[100] < 1.0


def test_gradient_accumulation_equals_one_big_batch():
    tokens = torch.randint(0, 50, (8, 17), generator=torch.Generator().manual_seed(1))
    big, small = _model(), _model()
    next_token_loss(big, tokens)[0].backward()
    for half in tokens.chunk(2):
        (next_token_loss(small, half)[0] / 2).backward()
    for (name, a), (_, b) in zip(big.named_parameters(), small.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_activation_checkpointing_changes_memory_not_results():
    tokens = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(2))
    plain, checkpointed = _model(), _model()
    enable_activation_checkpointing(checkpointed)
    loss_plain, loss_checkpointed = next_token_loss(plain, tokens)[0], next_token_loss(checkpointed, tokens)[0]
    loss_plain.backward()
    loss_checkpointed.backward()
    assert torch.equal(loss_plain, loss_checkpointed)
    assert list(plain.state_dict()) == list(checkpointed.state_dict())
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_parallelized_linears_keep_their_weight_decay():
    import os

    import torch.distributed as dist

    from tetra.parallel.grid import GridShape, ProcessGrid
    from tetra.parallel.parallelize import parallelize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29541")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        plain = _model()
        names = lambda group, model: sorted(n for n, p in model.named_parameters()  # noqa: E731
                                            if any(p is q for q in group["params"]))
        expected = names(parameter_groups(plain, 0.1)[0], plain)
        parallel = parallelize(_model(), ProcessGrid.build(GridShape()))
        assert names(parameter_groups(parallel, 0.1)[0], parallel) == expected
    finally:
        dist.destroy_process_group()


def test_scaled_parameters_get_their_own_learning_rate():
    """LoRA's new token rows learn faster (lora.new_token_lr_scale): their group's rate follows the schedule
    times the scale, without weight decay."""
    from tetra.train.optim import build_optimizer, set_lr

    model = Transformer(ModelConfig(vocab_size=20, hidden_size=8, n_layers=1, n_heads=2))
    model.embed.weight.tetra_lr_scale = 20.0
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3))
    set_lr(optimizer, 1e-3)
    [scaled] = [group for group in optimizer.param_groups if group.get("lr_scale")]
    assert scaled["params"] == [model.embed.weight] and scaled["weight_decay"] == 0.0
    assert scaled["lr"] == pytest.approx(2e-2)
    assert all(group["lr"] == pytest.approx(1e-3) for group in optimizer.param_groups if group is not scaled)
