"""Faults done to a one-process run, and recovered from with nothing lost beyond the last checkpoint: a kill at
every kind of point of a save, a damaged newest checkpoint, damaged data, SIGUSR1 checkpoints, non-finite steps
(stop or skip) and loss spikes. Multi-process faults are in test_reliability_grid.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train import run_config, run_values, wait_for_metrics
from tetra.cli import main
from tetra.config import dump_toml
from tetra.data.batch import as_batch
from tetra.errors import CheckpointError, DataError
from tetra.model.safetensors_io import read_tensors
from tetra.train import trainer
from tetra.train.checkpoint import list_checkpoints, newest_sound_checkpoint
from tetra.train.loop import build_loop
from tetra.train.metrics import read_metrics

WORKER = Path(__file__).parent / "fault_worker.py"
STEPS = {"train": {"max_steps": 6, "warmup_steps": 1}, "run": {"checkpoint_every": 2, "keep_checkpoints": 2}}


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def flip_a_byte(path: Path, offset: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def run_worker(config_path: Path, env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), "train", str(config_path), "--no-progress", *arguments],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **env})


@pytest.fixture(scope="module")
def straight(prepared_data, tmp_path_factory) -> dict[int, float]:
    """Losses of an undisturbed run, the reference every recovered run must equal."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    trainer.train(*run_config(prepared_data, run_dir, **STEPS), show_progress=False)
    return losses(run_dir)


def test_a_damaged_newest_checkpoint_is_named_and_skipped(prepared_data, tmp_path, straight, capsys):
    run_dir = tmp_path / "run"
    trainer.train(*run_config(prepared_data, run_dir, **STEPS), show_progress=False)
    newest = run_dir / "checkpoints" / "step-0000006"
    flip_a_byte(newest / "model.safetensors")  # same size: only the checksum sees it

    assert main(["checkpoint", "verify", str(run_dir), "--quick"]) == 0  # sizes agree
    capsys.readouterr()
    assert main(["checkpoint", "verify", str(run_dir)]) == 2
    out, err = capsys.readouterr()
    assert "ok       " + str(run_dir / "checkpoints" / "step-0000004") in out
    assert "DAMAGED  " + str(newest) in out and "model.safetensors does not match" in out
    assert "1 of 2 checkpoints" in err and "step-0000006" in err

    with pytest.raises(CheckpointError, match="damaged or incomplete.*model.safetensors"):
        trainer.train(*run_config(prepared_data, run_dir, **STEPS), resume=str(newest), show_progress=False)
    capsys.readouterr()
    resumed = trainer.train(*run_config(prepared_data, run_dir, **STEPS), resume="auto", show_progress=False)
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}" in err and "resuming from the newest sound checkpoint" in err
    assert resumed.step == 6 and losses(run_dir) == straight  # steps 5 and 6 again, exactly
    assert main(["checkpoint", "verify", str(newest)]) == 0  # rewritten whole


def test_nothing_sound_left_is_a_clear_error(prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    trainer.train(*run_config(prepared_data, run_dir, **STEPS), show_progress=False)
    for folder in list_checkpoints(run_dir):
        (folder / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="every checkpoint under .* is damaged"):
        trainer.train(*run_config(prepared_data, run_dir, **STEPS), resume="auto", show_progress=False)


def _count_save_changes(config_path: Path, tmp_path: Path) -> int:
    count = tmp_path / "count.txt"
    result = run_worker(config_path, {"TETRA_FAULT_KILL": "4:0:0", "TETRA_FAULT_COUNT": str(count)})
    assert result.returncode == 0, result.stderr[-2000:]
    return int(count.read_text())


def _kill_saves_at(prepared_data, tmp_path: Path, straight: dict[int, float], async_checkpoint: bool,
                   every: bool) -> None:
    """Kill the save of step 4 at its first, middle and last file-system change (or at every one); what is left
    must resume to exactly the undisturbed losses."""
    values = run_values(prepared_data, tmp_path / "probe", **STEPS)
    values["run"]["async_checkpoint"] = async_checkpoint
    (tmp_path / "probe.toml").write_text(dump_toml(values))
    changes = _count_save_changes(tmp_path / "probe.toml", tmp_path)
    assert changes >= 10  # folders, files, the manifest, renames, the old checkpoint's removal
    for event in range(1, changes + 1) if every else sorted({1, changes // 2, changes}):
        run_dir = tmp_path / f"kill-{event}"
        values["run"]["dir"] = str(run_dir)
        config_path = tmp_path / f"kill-{event}.toml"
        config_path.write_text(dump_toml(values))
        killed = run_worker(config_path, {"TETRA_FAULT_KILL": f"4:{event}:0"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        sound, skipped = newest_sound_checkpoint(run_dir)
        assert not skipped and sound is not None and sound.name in ("step-0000002", "step-0000004"), event
        trainer.train(*run_config(prepared_data, run_dir, **STEPS), resume="auto", show_progress=False)
        assert losses(run_dir) == straight, event
        assert main(["checkpoint", "verify", str(run_dir)]) == 0


@pytest.mark.parametrize("async_checkpoint", [False, True])
def test_a_kill_in_a_save_leaves_a_sound_checkpoint(prepared_data, tmp_path, straight, async_checkpoint):
    _kill_saves_at(prepared_data, tmp_path, straight, async_checkpoint, every=False)


@pytest.mark.slow
def test_a_kill_at_every_point_of_a_save_leaves_a_sound_checkpoint(prepared_data, tmp_path, straight):
    _kill_saves_at(prepared_data, tmp_path, straight, async_checkpoint=False, every=True)


def test_sigusr1_checkpoints_and_training_goes_on(prepared_data, tmp_path):
    config, _ = run_config(prepared_data, tmp_path / "run", train={"max_steps": 100000, "warmup_steps": 10},
                           run={"checkpoint_every": 0})
    (tmp_path / "run.toml").write_text(config.to_toml())
    process = subprocess.Popen([sys.executable, "-m", "tetra", "train", str(tmp_path / "run.toml"), "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_metrics(tmp_path / "run", 2)
    process.send_signal(signal.SIGUSR1)
    deadline = time.time() + 120
    while not list_checkpoints(tmp_path / "run") and time.time() < deadline:
        time.sleep(0.2)
    first = list_checkpoints(tmp_path / "run")
    time.sleep(1.0)
    alive = process.poll() is None
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert alive and process.returncode == 0, err
    assert len(first) == 1
    stops = list_checkpoints(tmp_path / "run")
    assert len(stops) == 2 and int(stops[1].name[5:]) > int(first[0].name[5:])  # it kept training, then stopped


def fail_the_second_save(monkeypatch) -> None:
    """The second checkpoint's optimizer file cannot be written: the disk is full."""
    from tetra.train import checkpoint_write

    calls = {"n": 0}
    real_write = checkpoint_write.write_tensors

    def failing_write(tensors, folder, stem="model", **options):
        if stem == "optimizer":
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("disk full")
        return real_write(tensors, folder, stem, **options)

    monkeypatch.setattr(checkpoint_write, "write_tensors", failing_write)


def inject_loss(monkeypatch, steps: set[int], value: float) -> None:
    """The loss of these (0-based) steps reads `value` in this process, as an overflow would make it."""
    real_compute = trainer.Loop.compute

    def compute(self, step):
        step_loss, grad_norm = real_compute(self, step)
        if step in steps:
            step_loss.loss = value
        return step_loss, grad_norm

    monkeypatch.setattr(trainer.Loop, "compute", compute)


def test_skip_policy_drops_the_update_and_counts_it(prepared_data, tmp_path, monkeypatch, capsys):
    inject_loss(monkeypatch, {2}, float("nan"))
    run_dir = tmp_path / "run"
    config, explicit = run_config(prepared_data, run_dir, train={"on_nonfinite": "skip"},
                                  run={"checkpoint_every": 1, "keep_checkpoints": 10})
    result = trainer.train(config, explicit, show_progress=False)
    assert result.step == 6
    before, after = (read_tensors(run_dir / "checkpoints" / f"step-000000{n}") for n in (2, 3))
    optimizer_before, optimizer_after = (read_tensors(run_dir / "checkpoints" / f"step-000000{n}", "optimizer")
                                         for n in (2, 3))
    assert all(torch.equal(before[name], after[name]) for name in before)  # step 3 changed nothing
    assert all(torch.equal(optimizer_before[key], optimizer_after[key]) for key in optimizer_before)
    after_4 = read_tensors(run_dir / "checkpoints" / "step-0000004")
    assert not all(torch.equal(after[name], after_4[name]) for name in after)  # step 4 trained again
    records = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}
    assert records[3]["skipped"] and "loss" not in records[3] and records[3]["nonfinite_skipped"] == 1
    assert records[6]["nonfinite_skipped"] == 1 and records[6]["nonfinite_in_row"] == 0
    assert "step 3: a non-finite loss or gradient norm on some rank (here loss nan" in capsys.readouterr().err


def test_skip_policy_stops_after_too_many_in_a_row(prepared_data, tmp_path, monkeypatch):
    inject_loss(monkeypatch, {1, 2, 3, 4, 5}, float("inf"))
    config, explicit = run_config(prepared_data, tmp_path / "run",
                                  train={"on_nonfinite": "skip", "max_nonfinite_skips": 2})
    with pytest.raises(trainer.NonFiniteLossError, match="became inf at step 4 .*3 non-finite steps in a row"):
        trainer.train(config, explicit, show_progress=False)


def test_a_loss_spike_is_reported_with_its_data_positions(prepared_data, tmp_path, monkeypatch, capsys):
    inject_loss(monkeypatch, {4}, 50.0)
    run_dir = tmp_path / "run"
    config, explicit = run_config(prepared_data, run_dir, train={"spike_sigmas": 4.0, "spike_window": 3})
    trainer.train(config, explicit, show_progress=False)
    err = capsys.readouterr().err
    assert "loss spike at step 5: 50.0000" in err and "data positions 8-9" in err  # grad_accum 2
    spikes = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss_spike" in r]
    assert [r["step"] for r in spikes] == [5] and spikes[0]["loss_spike"]["data_positions"] == [8, 9]
    assert spikes[0]["loss_spikes"] == 1

    # the warning's command shows exactly the sequences the step read
    assert f"tetra data inspect {run_dir} --position 8" in err
    assert main(["data", "inspect", str(run_dir), "--position", "8", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    loop, _ = build_loop(config, explicit)
    assert shown["ids"] == as_batch(loop.train_batches.batch(8)).tokens.tolist() and len(shown["text"]) == 4


def test_damaged_data_is_caught_by_size_at_open_and_by_hash_on_request(prepared_data, tmp_path, capsys):
    from tetra.data.shards import PreparedData

    copy = tmp_path / "data"
    shutil.copytree(prepared_data, copy)
    assert main(["data", "verify", str(copy)]) == 0
    flip_a_byte(copy / "train-00000.bin", offset=100)
    PreparedData.open(copy)  # same size: opening stays cheap
    assert main(["data", "verify", str(copy)]) == 2
    assert "train-00000.bin does not match its recorded sha256" in capsys.readouterr().err
    (copy / "val-00000.bin").write_bytes(b"")
    with pytest.raises(DataError, match="truncated or damaged.*val-00000.bin has 0 bytes"):
        PreparedData.open(copy)


def test_inspecting_a_position_needs_a_run_folder(prepared_data, capsys):
    assert main(["data", "inspect", str(prepared_data), "--position", "3"]) == 2
    assert "is not a training run folder" in capsys.readouterr().err


def test_a_failed_background_save_stops_the_run_and_keeps_the_previous_checkpoint(prepared_data, tmp_path,
                                                                                  monkeypatch):
    fail_the_second_save(monkeypatch)
    run_dir = tmp_path / "run"
    config, explicit = run_config(prepared_data, run_dir, run={**STEPS["run"], "async_checkpoint": True})
    with pytest.raises(OSError, match="disk full"):  # raised in the training thread at the next save
        trainer.train(config, explicit, show_progress=False)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000002"]
    assert main(["checkpoint", "verify", str(run_dir)]) == 0
