"""Training: exact resume, graceful stops, atomic checkpoints, metrics, and refusals of what cannot work."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from tetra.config import build_run_config
from tetra.errors import CheckpointError, DataError
from tetra.model.safetensors_io import read_tensors
from tetra.train import trainer
from tetra.train.metrics import read_metrics

TINY_MODEL = {"hidden_size": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 64}


def run_values(data_path: Path, run_dir: Path, model: dict | None = None, **sections) -> dict:
    """The nested dict a TOML file would hold for a tiny run."""
    values = {"model": dict(TINY_MODEL if model is None else model),
              "data": {"path": str(data_path), "seq_len": 16},
              "train": {"max_steps": 6, "batch_size": 4, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 2,
                        "precision": "fp32"},
              "eval": {"every": 3, "batches": 2},
              "run": {"dir": str(run_dir), "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 5,
                      "device": "cpu"}}
    for section, changes in sections.items():
        values.setdefault(section, {}).update(changes)
    return values


def run_config(data_path: Path, run_dir: Path, model: dict | None = None, **sections):
    values = run_values(data_path, run_dir, model, **sections)
    return build_run_config(values), values["model"]


class StopAfter:
    """Stands in for StopRequest: asks for a stop after `polls` steps, as a SIGTERM would."""

    checkpoint_requested = False

    def __init__(self, polls: int) -> None:
        self.polls = polls

    def checkpoint_taken(self) -> None:
        return None

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None

    @property
    def requested(self):
        self.polls -= 1
        return "SIGTERM" if self.polls < 0 else None


def test_resume_after_a_stop_is_bitwise_identical(prepared_data, tmp_path, monkeypatch):
    straight = trainer.train(*run_config(prepared_data, tmp_path / "straight"), show_progress=False)
    monkeypatch.setattr(trainer, "StopRequest", StopAfter(3))
    stopped = trainer.train(*run_config(prepared_data, tmp_path / "resumed"), show_progress=False)
    assert stopped.stopped_by == "SIGTERM" and stopped.step == 4
    monkeypatch.undo()
    resumed = trainer.train(*run_config(prepared_data, tmp_path / "resumed"), resume="auto", show_progress=False)
    assert resumed.step == straight.step == 6
    losses = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]
    again = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")]
    assert losses == again and len(losses) == 6
    final_a, final_b = read_tensors(straight.checkpoint), read_tensors(resumed.checkpoint)
    assert all(torch.equal(final_a[name], final_b[name]) for name in final_a)
    optimizer_a = read_tensors(straight.checkpoint, "optimizer")
    optimizer_b = read_tensors(resumed.checkpoint, "optimizer")
    assert all(torch.equal(optimizer_a[name], optimizer_b[name]) for name in optimizer_a)


def test_run_folder_contents(prepared_data, tmp_path):
    config, explicit = run_config(prepared_data, tmp_path / "run")
    result = trainer.train(config, explicit, show_progress=False)
    run_dir = tmp_path / "run"
    recorded = build_run_config(tomllib.loads((run_dir / "config.toml").read_text()))
    assert (recorded.train, recorded.data, recorded.eval, recorded.run) == (config.train, config.data, config.eval,
                                                                           config.run)
    from tetra.data.shards import PreparedData

    vocab = PreparedData.open(prepared_data).vocab_size
    assert recorded.model.vocab_size == vocab and recorded.model.hidden_size == 32  # the model as built
    records = read_metrics(run_dir / "metrics.jsonl")
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu"} <= set(records[-1])
    assert {"val_loss", "val_perplexity"} <= set(records[2])
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["samples"] == 6 * 4 * 2
    assert records[0]["lr"] == pytest.approx(0.5e-2) and records[1]["lr"] == pytest.approx(1e-2)


def test_keeps_only_the_newest_checkpoints_and_saves_atomically(prepared_data, tmp_path, monkeypatch):
    config, explicit = run_config(prepared_data, tmp_path / "run", run={"checkpoint_every": 1, "keep_checkpoints": 2})
    trainer.train(config, explicit, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000005", "step-0000006"]

    from test_reliability import fail_the_second_save

    fail_the_second_save(monkeypatch)
    config, explicit = run_config(prepared_data, tmp_path / "failing", run={"checkpoint_every": 2})
    with pytest.raises(OSError, match="disk full"):
        trainer.train(config, explicit, show_progress=False)
    left = sorted(p.name for p in (tmp_path / "failing" / "checkpoints").iterdir())
    assert left == ["step-0000002"]  # the failed step-4 left nothing behind, step 2 is intact
    assert read_tensors(tmp_path / "failing" / "checkpoints" / "step-0000002", "optimizer")


def test_non_finite_loss_stops_with_the_last_good_checkpoint(prepared_data, tmp_path, monkeypatch):
    from test_reliability import inject_loss

    inject_loss(monkeypatch, {4}, float("nan"))
    config, explicit = run_config(prepared_data, tmp_path / "run")
    with pytest.raises(trainer.NonFiniteLossError, match="became nan at step 5.*step-0000003.*--resume auto"):
        trainer.train(config, explicit, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000003"]


def test_checkpoint_of_another_shape_is_refused_by_name(prepared_data, tmp_path):
    trainer.train(*run_config(prepared_data, tmp_path / "run"), show_progress=False)
    wider = dict(TINY_MODEL, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.gate\.weight is \[64, 32\] but the config implies"):
        trainer.train(*run_config(prepared_data, tmp_path / "run", model=wider), resume="auto", show_progress=False)


def test_data_that_does_not_fit_the_model_is_refused(prepared_data, tmp_path):
    with pytest.raises(DataError, match="data.seq_len = 128 is above the model's maximum of 64"):
        trainer.train(*run_config(prepared_data, tmp_path / "a", data={"seq_len": 128}), show_progress=False)
    from tetra.data.tokenizer import train_bpe
    from tetra.model import ModelConfig, Transformer
    from tetra.model.io import save_model

    other = train_bpe(["completely different text " * 50, "zzz yyy"], vocab_size=300)
    other.save(tmp_path / "other-tokenizer")
    save_model(Transformer(ModelConfig(**TINY_MODEL, vocab_size=300)), tmp_path / "other",
               tokenizer_from=tmp_path / "other-tokenizer")
    with pytest.raises(DataError) as error:
        other_config = run_config(prepared_data, tmp_path / "b", model={}, init={"checkpoint": str(tmp_path / "other")})
        trainer.train(*other_config, show_progress=False)
    assert "vocabulary (300) is smaller" in str(error.value) and "not the one" in str(error.value)


def test_fine_tune_a_hugging_face_folder_and_load_it_back(prepared_data, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    hf_config = Qwen2Config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(tmp_path / "base")
    for path in (prepared_data / "tokenizer").iterdir():
        shutil.copy(path, tmp_path / "base" / path.name)
    config, explicit = run_config(prepared_data, tmp_path / "run", model={},
                                  init={"checkpoint": str(tmp_path / "base")},
                                  train={"max_steps": 8, "lr": 3e-3}, eval={"every": 4})
    result = trainer.train(config, explicit, show_progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["val_loss"] < records[3]["val_loss"]
    from tetra.cli import main

    assert main(["convert", "to-hf", str(result.checkpoint), str(tmp_path / "export")]) == 0
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert type(tuned).__name__ == "Qwen2ForCausalLM"


def wait_for_metrics(run_dir: Path, lines: int, timeout: float = 120) -> None:
    """Until a run started in another process has logged `lines` metrics records (or the timeout passes)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while not (metrics.exists() and metrics.read_text().count("\n") >= lines) and time.time() < deadline:
        time.sleep(0.1)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(prepared_data, tmp_path):
    config_path = tmp_path / "run.toml"
    config, _ = run_config(prepared_data, tmp_path / "run", train={"max_steps": 100000, "warmup_steps": 10})
    config_path.write_text(config.to_toml())
    process = subprocess.Popen([sys.executable, "-m", "tetra", "train", str(config_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_metrics(tmp_path / "run", 2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    state = json.loads((Path(out.split("checkpoint ")[-1].strip()) / "trainer_state.json").read_text())
    assert 2 <= state["step"] < 100000


def test_a_fresh_run_never_mixes_into_an_existing_one(prepared_data, tmp_path, capsys):
    config, explicit = run_config(prepared_data, tmp_path / "run")
    trainer.train(config, explicit, show_progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    from tetra.cli import main

    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume auto" in err and "Traceback" not in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_train_command_errors_exit_2(prepared_data, tmp_path, capsys):
    from tetra.cli import main

    capsys.readouterr()
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    path = tmp_path / "run.toml"
    path.write_text(f'[data]\npath = "{tmp_path / "nothing"}"\n[train]\nwarmup_steps = 1\nmax_steps = 2\n')
    assert main(["train", str(path), f"run.dir={tmp_path / 'r'}"]) == 2
    assert "is not a prepared dataset" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_training_matches_eager(prepared_data, tmp_path):
    eager = trainer.train(*run_config(prepared_data, tmp_path / "eager", train={"max_steps": 3, "warmup_steps": 1}),
                          show_progress=False)
    compiled = trainer.train(*run_config(prepared_data, tmp_path / "compiled",
                                         train={"max_steps": 3, "warmup_steps": 1, "compile": True}),
                             show_progress=False)
    assert compiled.last_loss == pytest.approx(eager.last_loss, rel=1e-4)


@pytest.mark.slow
def test_compiled_model_matches_eager_logits_and_gradients():
    """Layer by layer, not only a loss after a few steps (which barely sees the positions at initialization): the
    compiled forms of the layers (rotary positions take their fusable textbook form there) compute what eager does."""
    from tetra.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_position_embeddings=32))
    tokens = torch.randint(0, 64, (2, 32))
    results = []
    for forward in (model, torch.compile(model)):
        logits = forward(tokens)
        logits.square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    (eager_logits, eager_grads), (compiled_logits, compiled_grads) = results
    assert torch.allclose(compiled_logits, eager_logits, atol=1e-5)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
        assert torch.allclose(compiled_grad, eager_grad, atol=1e-6, rtol=1e-4)


def test_tensorboard_events_when_installed(prepared_data, tmp_path):
    pytest.importorskip("tensorboard")
    trainer.train(*run_config(prepared_data, tmp_path / "run"), show_progress=False)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
