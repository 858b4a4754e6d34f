"""GaLore and Conda: full-rank GaLore with a fixed projector trains like AdamW (not equal: Adam's per-coordinate
normalization is taken in the rotated coordinates), the projected state has the promised shapes, both resume
bit-exactly through checkpoints with accumulation and clipping, and the settings they cannot run with are named."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from tetra.cli import main
from tetra.config import TrainConfig
from tetra.errors import ConfigError
from tetra.model import ModelConfig, Transformer
from tetra.train.losses import next_token_loss
from tetra.train.optim import build_optimizer


def _model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, n_layers=2, n_heads=4))
    model.init_weights()
    return model


def _losses(model: Transformer, config: TrainConfig, steps: int = 30) -> list[float]:
    tokens = torch.randint(0, 64, (8, 33), generator=torch.Generator().manual_seed(1))
    optimizer = build_optimizer(model, config)
    losses = []
    for _ in range(steps):
        loss, _ = next_token_loss(model, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_full_rank_galore_with_a_fixed_projector_trains_like_adamw():
    model = _model()
    adamw = _losses(copy.deepcopy(model), TrainConfig(lr=3e-3))
    galore = _losses(copy.deepcopy(model), TrainConfig(lr=3e-3, optimizer="galore", galore_rank=1000,
                                                         galore_scale=1.0, projection_interval=1000))
    # Same first step size per coordinate group, different coordinates: within 5% over 30 steps, not equal.
    assert max(abs(a - b) / a for a, b in zip(adamw, galore, strict=True)) < 0.05 and adamw != galore
    assert galore[-1] < 0.5 * galore[0]
    conda = _losses(copy.deepcopy(model), TrainConfig(lr=3e-3, optimizer="conda", projection_interval=10))
    assert conda[-1] < 0.5 * conda[0]


def test_the_projected_state_has_the_promised_shapes():
    model = _model()
    optimizer = build_optimizer(model, TrainConfig(optimizer="galore", galore_rank=4))
    next_token_loss(model, torch.randint(0, 64, (2, 9)))[0].backward()
    optimizer.step()
    up = model.blocks[0].mlp.up.weight  # [mlp width, 32]: projected on the right, moments [mlp width, 4]
    state = optimizer.state[up]
    assert state["exp_avg"].shape == (up.shape[0], 4) and state["projector"].shape == (32, 4)
    head_state = optimizer.state[model.head.weight]  # not a block matrix: full AdamW moments
    assert head_state["exp_avg"].shape == model.head.weight.shape
    conda = build_optimizer(model, TrainConfig(optimizer="conda"))
    next_token_loss(model, torch.randint(0, 64, (2, 9)))[0].backward()
    conda.step()
    assert conda.state[up]["basis"].shape == (32, 32) and conda.state[up]["exp_avg_sq"].shape == up.shape


def _arithmetic_run(tmp_path, optimizer: str, max_steps: int, checkpoint_every: int, grad_clip: float = 0.5):
    """A tiny run's TOML on a small addition data set, with the projected optimizer refreshing every 2 steps."""
    data = tmp_path / "data"
    assert main(["data", "arithmetic", "--max-digits", "3", "--examples", "300", "--out", str(data)]) == 0
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\npath = "{data}"\nseq_len = 32\n[model]\nhidden_size = 32\nn_layers = 2\n'
                      f'n_heads = 2\n[train]\nmax_steps = {max_steps}\nbatch_size = 2\ngrad_accum = 2\n'
                      f'warmup_steps = 1\ngrad_clip = {grad_clip}\nprecision = "fp32"\noptimizer = "{optimizer}"\n'
                      'galore_rank = 4\nprojection_interval = 2\n[eval]\nevery = 0\n[run]\nlog_every = 1\n'
                      f'checkpoint_every = {checkpoint_every}\n')
    return config


@pytest.mark.parametrize("optimizer", ["galore", "conda"])
def test_training_resumes_bit_exactly_with_accumulation_and_clipping(tmp_path, optimizer):
    config = _arithmetic_run(tmp_path, optimizer, max_steps=6, checkpoint_every=3)

    def losses(run: str, *extra: str) -> list[float]:
        assert main(["train", str(config), "--no-progress", f"run.dir={tmp_path / run}", *extra]) == 0
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    whole = losses("whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")  # as if stopped after the step-3 checkpoint
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000006")
    resumed = losses("cut", "--resume", "auto")
    assert resumed == whole and len(whole) == 6


def test_settings_they_cannot_run_with_are_named(tmp_path, capsys):
    with pytest.raises(ConfigError, match="Drop parallel.zero1"):
        build_optimizer(_model(), TrainConfig(optimizer="galore"), zero1=True)
    config = tmp_path / "run.toml"
    config.write_text('[data]\npath = "x"\n')
    assert main(["train", str(config), "--no-progress", "train.optimizer=adafactor"]) == 2
    assert "train.optimizer = 'adafactor'" in capsys.readouterr().err
    assert main(["train", str(config), "--no-progress", "train.optimizer=conda", "parallel.zero1=true"]) == 2
    assert "drop parallel.zero1" in capsys.readouterr().err
    assert main(["train", str(config), "--no-progress", "train.optimizer=galore", "parallel.strategy=fsdp2"]) == 2
    assert "parallel.strategy = \"4d\"" in capsys.readouterr().err


@pytest.mark.parametrize("optimizer, split", [
    ("galore", ["parallel.strategy=ddp"]), ("conda", ["parallel.strategy=ddp"]), ("galore", ["parallel.depth=2"]),
    ("conda", ["parallel.col=2", "train.batch_size=4"])])  # columns split the weights, not the batch
def test_two_process_training_equals_one_process(tmp_path, optimizer, split):
    """Under torch DDP (2 gloo ranks, 2 sequences each) the projected optimizers see the averaged gradient; on the
    4D grid (weights sharded over depth, or split over columns) each rank updates its piece of every matrix. Either
    way the losses equal one process with the whole batch of 4."""
    import subprocess
    import sys

    from tetra.parallel.launch import free_port

    config = _arithmetic_run(tmp_path, optimizer, max_steps=5, checkpoint_every=0, grad_clip=1.0)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), "-m", "tetra", "train", str(config), "--no-progress",
                          f"run.dir={tmp_path / 'ddp'}", *split],
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert main(["train", str(config), "--no-progress", f"run.dir={tmp_path / 'one'}", "train.batch_size=4"]) == 0

    def losses(run: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert losses("ddp") == pytest.approx(losses("one"), rel=1e-4) and len(losses("one")) == 5


def test_a_grid_checkpoint_resumes_on_one_process(tmp_path):
    """GaLore on depth 2 (moments and projector saved as rectangles of their whole shapes), stopped after step 3 and
    resumed by one process with the same global batch: the remaining losses agree within reduction-order noise."""
    import subprocess
    import sys

    from tetra.parallel.launch import free_port

    config = _arithmetic_run(tmp_path, "galore", max_steps=6, checkpoint_every=3)
    grid = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "tetra", "train", str(config), "--no-progress",
                           f"run.dir={tmp_path / 'grid'}", "parallel.depth=2"],
                          capture_output=True, text=True, timeout=300)
    assert grid.returncode == 0, grid.stderr[-3000:]
    shutil.copytree(tmp_path / "grid", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000006")
    assert (tmp_path / "cut" / "checkpoints" / "step-0000003" / "shards").is_dir()
    assert main(["train", str(config), "--no-progress", f"run.dir={tmp_path / 'cut'}", "train.batch_size=4",
                 "--resume", "auto"]) == 0

    def losses(run: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses("cut")) == 6 and losses("cut") == pytest.approx(losses("grid"), rel=1e-5)


def test_resuming_with_another_rank_or_optimizer_is_refused_by_name(tmp_path, capsys):
    config = _arithmetic_run(tmp_path, "galore", max_steps=2, checkpoint_every=2)
    assert main(["train", str(config), "--no-progress", f"run.dir={tmp_path / 'run'}"]) == 0
    capsys.readouterr()
    for change in ("train.galore_rank=8", "train.optimizer=conda"):
        assert main(["train", str(config), "--no-progress", f"run.dir={tmp_path / 'run'}", "train.max_steps=4",
                     change, "--resume", "auto"]) == 2
        error = capsys.readouterr().err
        assert "optimizer state blocks.0." in error and "train.galore_rank" in error and "Traceback" not in error
