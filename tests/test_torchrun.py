"""`torchrun ... tetra train` on 2 gloo processes: same losses as one process, and its sharded checkpoints reload
into another grid, into one process, and into `tetra convert to-hf`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import run_config, run_values
from tetra.cli import main
from tetra.config import dump_toml
from tetra.parallel.launch import free_port
from tetra.train import trainer
from tetra.train.metrics import read_metrics

OVERRIDES = {"train": {"max_steps": 4, "warmup_steps": 1}, "run": {"checkpoint_every": 2}}


def _torchrun(config_path: Path, *arguments: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "tetra", "train", str(config_path), "--no-progress", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def test_two_processes_match_one_and_checkpoints_move_between_grids(prepared_data, tmp_path):
    single = trainer.train(*run_config(prepared_data, tmp_path / "single", **OVERRIDES), show_progress=False)
    (tmp_path / "grid.toml").write_text(dump_toml(run_values(prepared_data, tmp_path / "grid", **OVERRIDES)))
    _torchrun(tmp_path / "grid.toml", "parallel.row=2", "parallel.gemm_layout=in_out", "run.export_hf=true")
    expected, actual = _losses(single.run_dir), _losses(tmp_path / "grid")
    assert sorted(actual) == [1, 2, 3, 4]
    for step, loss in expected.items():
        assert actual[step] == pytest.approx(loss, rel=1e-5), step

    # The row=2 checkpoint is sharded (from weights stored [in, out]); step 2 resumes on a column grid (layouts
    # timed by rank 0 and shared) and on one process, continuing the run.
    written = tmp_path / "grid" / "checkpoints" / "step-0000002"
    assert (written / "shards" / ".metadata").is_file() and not (written / "model.safetensors").exists()
    for name in ("col", "one"):
        shutil.copytree(tmp_path / "grid" / "checkpoints" / "step-0000002",
                        tmp_path / name / "checkpoints" / "step-0000002")
    _torchrun(tmp_path / "grid.toml", "parallel.col=2", f"run.dir={tmp_path / 'col'}", "--resume", "auto")
    trainer.train(*run_config(prepared_data, tmp_path / "one", **OVERRIDES), resume="auto", show_progress=False)
    for name in ("col", "one"):
        resumed = _losses(tmp_path / name)
        for step in (3, 4):
            assert resumed[step] == pytest.approx(actual[step], rel=1e-5), (name, step)

    assert main(["convert", "to-hf", str(tmp_path / "grid" / "checkpoints" / "step-0000004"),
                 str(tmp_path / "hf")]) == 0
    from test_hf_export import same_files

    same_files(tmp_path / "hf", tmp_path / "grid" / "hf")  # run.export_hf: the same folder, streamed at the end
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.hidden_size == 32

    # A new run on a depth grid starts from the sharded checkpoint, each rank reading only its depth shards, and
    # trains like one process started from it.
    start = {"init": {"checkpoint": str(tmp_path / "grid" / "checkpoints" / "step-0000004")}, **OVERRIDES}
    whole_batch = {**start, "train": {**OVERRIDES["train"], "batch_size": 8}}  # = 2 depth ranks x 4 sequences
    alone = trainer.train(*run_config(prepared_data, tmp_path / "from-one", **whole_batch), show_progress=False)
    (tmp_path / "from.toml").write_text(dump_toml(run_values(prepared_data, tmp_path / "from-grid", **start)))
    _torchrun(tmp_path / "from.toml", "parallel.depth=2")
    for step, loss in _losses(alone.run_dir).items():
        assert _losses(tmp_path / "from-grid")[step] == pytest.approx(loss, rel=1e-5), step

    # Tensor-parallel decoding from the sharded checkpoint (each rank reads its pieces): the tokens of one process.
    final = str(tmp_path / "grid" / "checkpoints" / "step-0000004")
    arguments = ["generate", final, "--prompt", "def main(", "--prompt", "import", "--temperature", "0",
                 "--max-new-tokens", "8", "--json"]
    single_process = subprocess.run([sys.executable, "-m", "tetra", *arguments], capture_output=True, text=True,
                                    timeout=300)
    on_grid = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-port", str(free_port()), "-m", "tetra", *arguments, "--grid", "col=2"],
                             capture_output=True, text=True, timeout=300)
    assert single_process.returncode == 0 and on_grid.returncode == 0, on_grid.stderr[-3000:]
    expected = [row["text"] for row in json.loads(single_process.stdout)["completions"]]
    assert [row["text"] for row in json.loads(on_grid.stdout)["completions"]] == expected  # rank 0 alone prints


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torch_strategies_match_one_process_and_resume_anywhere(prepared_data, tmp_path, strategy):
    """DDP and FSDP2 baselines (parallel.strategy) train like one process, with accumulation; their checkpoints
    are in the single-process format and resume in one process."""
    whole_batch = {**OVERRIDES, "train": {**OVERRIDES["train"], "batch_size": 8}}  # = 2 ranks x 4 sequences
    single = trainer.train(*run_config(prepared_data, tmp_path / "single", **whole_batch), show_progress=False)
    (tmp_path / "run.toml").write_text(dump_toml(run_values(prepared_data, tmp_path / strategy, **OVERRIDES)))
    _torchrun(tmp_path / "run.toml", f"parallel.strategy={strategy}")
    expected, actual = _losses(single.run_dir), _losses(tmp_path / strategy)
    for step, loss in expected.items():
        assert actual[step] == pytest.approx(loss, rel=1e-5), step
    assert (tmp_path / strategy / "checkpoints" / "step-0000002" / "model.safetensors").is_file()
    shutil.copytree(tmp_path / strategy / "checkpoints" / "step-0000002",
                    tmp_path / "one" / "checkpoints" / "step-0000002")
    trainer.train(*run_config(prepared_data, tmp_path / "one", **whole_batch), resume="auto", show_progress=False)
    resumed = _losses(tmp_path / "one")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(actual[step], rel=1e-5), step
