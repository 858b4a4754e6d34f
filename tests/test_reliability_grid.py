"""Faults done to torchrun jobs on 2 gloo processes (a 4D grid, row = 2, sharded checkpoints), each recovered with
losses equal to one undisturbed process: SIGTERM to torchrun, a NaN on one rank, a rank SIGKILLed under
--max-restarts, and kills at points of a sharded save (synchronous and asynchronous)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_reliability import STEPS, WORKER, inject_loss, losses
from test_train import run_config, run_values, wait_for_metrics
from tetra.config import dump_toml
from tetra.parallel.launch import free_port
from tetra.train import trainer
from tetra.train.checkpoint import list_checkpoints, newest_sound_checkpoint
from tetra.train.distributed import Launch
from tetra.train.metrics import read_metrics

GRID = ("parallel.row=2", "parallel.gemm_layout=out_in")


def torchrun_command(config_path: Path, *arguments: str, restarts: int = 0, processes: int = 2,
                     grid: tuple[str, ...] = GRID, rendezvous: str = "c10d") -> list[str]:
    """c10d rendezvous by default, as for several hosts; "static" is torchrun's --master-port default."""
    port = free_port()
    meeting = (["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}"]
               if rendezvous == "c10d" else ["--master-port", str(port)])
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
            *meeting, "--max-restarts", str(restarts), "--no-python", sys.executable, str(WORKER), "train",
            str(config_path), "--no-progress", *grid, *arguments]


def torchrun(config_path: Path, *arguments: str, env: dict[str, str] | None = None,
             **options) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(config_path, *arguments, **options), capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def write_config(prepared_data, tmp_path: Path, name: str, **sections) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(dump_toml(run_values(prepared_data, tmp_path / name, **sections)))
    return path


def assert_equal_losses(actual: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(actual) == sorted(expected)
    for step, loss in expected.items():
        assert actual[step] == pytest.approx(loss, rel=1e-5), step


@pytest.fixture(scope="module")
def straight(prepared_data, tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    trainer.train(*run_config(prepared_data, run_dir, **STEPS), show_progress=False)
    return losses(run_dir)


def test_sigterm_to_torchrun_saves_one_consistent_checkpoint(prepared_data, tmp_path):
    """As Slurm does before a time limit: every rank finishes its step, they save one checkpoint together, and
    every rank exits 0 (torchrun itself still reports the signal); the run resumes on one process exactly."""
    long = {"train": {"max_steps": 400, "warmup_steps": 2, "schedule": "constant"},  # lr free of max_steps
            "run": {"checkpoint_every": 0, "log_every": 1}}
    config_path = write_config(prepared_data, tmp_path, "grid", **long)
    process = subprocess.Popen(torchrun_command(config_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    metrics = tmp_path / "grid" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert "stopped by SIGTERM" in err and "ChildFailedError" not in err, err[-3000:]
    saved = list_checkpoints(tmp_path / "grid")
    assert len(saved) == 1 and (saved[0] / "shards" / ".metadata").is_file()
    stopped_at = int(saved[0].name[5:])
    assert 3 <= stopped_at < 400 and max(losses(tmp_path / "grid")) == stopped_at

    # the same steps on one process, then the rest of the run from the grid's checkpoint
    short = {"train": {**long["train"], "max_steps": stopped_at + 3}, "run": long["run"]}
    reference = trainer.train(*run_config(prepared_data, tmp_path / "one", **short), show_progress=False)
    assert_equal_losses(losses(tmp_path / "grid"), {s: v for s, v in losses(reference.run_dir).items()
                                                    if s <= stopped_at})
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    saved[0].rename(resumed / "checkpoints" / saved[0].name)
    trainer.train(*run_config(prepared_data, resumed, **short), resume="auto", show_progress=False)
    assert_equal_losses(losses(resumed), {s: v for s, v in losses(reference.run_dir).items() if s > stopped_at})


def test_launch_is_read_from_torchrun_or_srun():
    assert Launch.from_environment({}) == Launch(0, 1, 0)
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1"}
    assert Launch.from_environment(srun) == Launch(5, 8, 1)
    assert Launch.from_environment({**srun, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"}) == Launch(2, 4, 2)
    assert Launch.from_environment({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}) == Launch(0, 1, 0)


def test_preempted_srun_tasks_save_together_and_all_exit_zero(prepared_data, tmp_path):
    """Slurm's srun with one task per rank (no torchrun): every task gets SIGTERM before the time limit, they
    save one checkpoint together, and every process of the job exits 0."""
    long = {"train": {"max_steps": 400, "warmup_steps": 2}, "run": {"checkpoint_every": 0, "log_every": 1}}
    config_path = write_config(prepared_data, tmp_path, "srun", **long)
    port = str(free_port())
    base = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    tasks = [subprocess.Popen([sys.executable, "-m", "tetra", "train", str(config_path), "--no-progress", *GRID],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**base, "SLURM_PROCID": str(rank), "SLURM_STEP_NUM_TASKS": "2",
                                   "SLURM_LOCALID": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for rank in range(2)]
    wait_for_metrics(tmp_path / "srun", 3)
    for task in tasks:
        task.send_signal(signal.SIGTERM)
    ends = [task.communicate(timeout=120) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], [err[-2000:] for _, err in ends]
    assert "stopped by SIGTERM" in ends[0][1]
    saved = list_checkpoints(tmp_path / "srun")
    assert len(saved) == 1 and (saved[0] / "shards" / ".metadata").is_file()
    assert int(saved[0].name[5:]) == max(losses(tmp_path / "srun"))


def test_a_nan_on_one_rank_is_skipped_by_every_rank(prepared_data, tmp_path, monkeypatch):
    """Rank 1 alone sees a NaN loss at step 3: the ranks agree, all skip that update, and the run goes on equal
    to one process that skipped the same step."""
    skip = {"train": {**STEPS["train"], "on_nonfinite": "skip"}, "run": STEPS["run"]}
    result = torchrun(write_config(prepared_data, tmp_path, "grid", **skip), env={"TETRA_FAULT_NAN": "2:1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3: a non-finite loss or gradient norm on some rank" in result.stderr

    inject_loss(monkeypatch, {2}, float("nan"))
    one = trainer.train(*run_config(prepared_data, tmp_path / "one", **skip), show_progress=False)
    assert_equal_losses(losses(tmp_path / "grid"), losses(one.run_dir))
    skipped = [r["step"] for r in read_metrics(tmp_path / "grid" / "metrics.jsonl") if r.get("skipped")]
    assert skipped == [3]


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_a_killed_rank_restarts_and_resumes_from_the_last_checkpoint(prepared_data, tmp_path, rendezvous):
    """torchrun --max-restarts 1 on 4 ranks (data 2 x row 2): rank 3 is SIGKILLed as step 5 starts (after the
    step-4 checkpoint); torchrun restarts the group, which meets afresh (its own rendezvous keys, not the dead
    ranks'), resumes from step 4 (the launch always says --resume auto) and ends equal to an undisturbed run."""
    result = torchrun(write_config(prepared_data, tmp_path, "grid", **STEPS), "--resume", "auto",
                      env={"TETRA_FAULT_KILL_STEP": "4:3"}, restarts=1, processes=4,
                      grid=("parallel.data=2", "parallel.row=2", "parallel.gemm_layout=out_in"),
                      rendezvous=rendezvous)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exitcode: -9" in result.stderr  # torchrun saw the kill
    info = (tmp_path / "grid" / "run_info.json").read_text()
    assert "step-0000004" in info  # the restarted job resumed from the last checkpoint
    whole_batch = {**STEPS, "train": {**STEPS["train"], "batch_size": 8}}  # data 2 x 4 sequences
    one = trainer.train(*run_config(prepared_data, tmp_path / "one", **whole_batch), show_progress=False)
    assert_equal_losses(losses(tmp_path / "grid"), losses(one.run_dir))


def _count_sharded_save_changes(prepared_data, tmp_path: Path, rank: int, sections: dict) -> int:
    config_path = write_config(prepared_data, tmp_path, f"probe-{rank}", **sections)
    count = tmp_path / f"count-{rank}.txt"
    result = torchrun(config_path, env={"TETRA_FAULT_KILL": f"4:0:{rank}", "TETRA_FAULT_COUNT": str(count)})
    assert result.returncode == 0, result.stderr[-3000:]
    return int(count.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("async_checkpoint", [False, True])
def test_a_kill_in_a_sharded_save_leaves_a_sound_checkpoint(prepared_data, tmp_path, straight, async_checkpoint):
    """Rank 0 (which publishes) killed at the first, middle and last change of the step-4 save, rank 1 (shards
    only) in the middle of its own: torchrun ends the job, and a new launch resumes to the undisturbed losses."""
    sections = {"train": STEPS["train"], "run": {**STEPS["run"], "async_checkpoint": async_checkpoint}}
    changes = _count_sharded_save_changes(prepared_data, tmp_path, 0, sections)
    kills = [(event, 0) for event in sorted({1, changes // 2, changes})]
    kills.append((max(_count_sharded_save_changes(prepared_data, tmp_path, 1, sections) // 2, 1), 1))
    for event, rank in kills:
        name = f"kill-{rank}-{event}"
        config_path = write_config(prepared_data, tmp_path, name, **sections)
        killed = torchrun(config_path, env={"TETRA_FAULT_KILL": f"4:{event}:{rank}"})
        assert killed.returncode != 0, (name, killed.stderr[-2000:])
        sound, skipped = newest_sound_checkpoint(tmp_path / name)
        assert not skipped and sound is not None and sound.name in ("step-0000002", "step-0000004"), name
        resumed = torchrun(config_path, "--resume", "auto")
        assert resumed.returncode == 0, (name, resumed.stderr[-3000:])
        assert_equal_losses(losses(tmp_path / name), straight)
