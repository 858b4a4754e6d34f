"""A model that does not fit one process's memory limit trains on 4: it loads from a Hugging Face folder piece by
piece, trains, checkpoints, resumes and exports under an enforced limit (RLIMIT_DATA, inherited by every torchrun
worker); one process under the same limit stops with tetra's out-of-memory paragraph naming the planner's grid,
not an allocator traceback."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import run_values
from tetra.config import dump_toml
from tetra.parallel.launch import free_port

pytestmark = pytest.mark.slow

MIB = 2**20
# ~46M parameters: weights, gradients and AdamW state need ~740 MiB in one process, ~185 MiB per rank on 4.
MODEL = dict(hidden_size=512, n_layers=14, n_heads=8, intermediate_size=1408, max_position_embeddings=64)
# The data limit counts private mappings, threads' stacks and BLAS buffers besides tensors: an idle rank's is ~216
# MiB, a single process's more. Measured: 4 ranks train, checkpoint, resume and export under 900 MiB; one process
# runs out under 1200 MiB.
LIMIT = 1000 * MIB


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (LIMIT, LIMIT))


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=600, preexec_fn=_limited)


def _hf_base(folder: Path, tokenizer: Path) -> Path:
    from tetra.data.tokenizer import TextTokenizer
    from tetra.model import ModelConfig, Transformer
    from tetra.model.io import save_hf_model

    vocab = TextTokenizer.load(tokenizer).vocab_size
    model = Transformer(ModelConfig(vocab_size=vocab, eos_token_id=TextTokenizer.load(tokenizer).eos_id, **MODEL))
    model.init_weights(0.02, seed=0)
    return save_hf_model(model, folder, tokenizer_from=tokenizer)


def test_four_ranks_fit_where_one_process_runs_out(prepared_data, tmp_path):
    base = _hf_base(tmp_path / "base", prepared_data.parent / "tokenizer")
    values = run_values(prepared_data, tmp_path / "grid", model={}, init={"checkpoint": str(base)},
                        train={"max_steps": 2, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 1},
                        eval={"every": 0, "batches": 1},
                        run={"checkpoint_every": 2, "export_hf": True})
    (tmp_path / "grid.toml").write_text(dump_toml(values))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port"]
    train = ["-m", "tetra", "train", str(tmp_path / "grid.toml"), "--no-progress", "parallel.row=2",
             "parallel.col=2"]
    first = _run([*torchrun, str(free_port()), *train])
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _run([*torchrun, str(free_port()), *train, "train.max_steps=3", "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "grid" / "checkpoints" / "step-0000003").is_dir()
    from tetra.model.io import load_model

    exported = load_model(tmp_path / "grid" / "hf")  # the streamed export at the end of the run: a whole model
    assert exported.config.num_parameters() > 40e6 and torch.isfinite(exported.head.weight).all()

    values["run"]["dir"] = str(tmp_path / "one")
    (tmp_path / "one.toml").write_text(dump_toml(values))
    alone = _run([sys.executable, "-m", "tetra", "train", str(tmp_path / "one.toml"), "--no-progress"])
    assert alone.returncode == 2, alone.stderr[-3000:]
    assert "Traceback" not in alone.stderr
    assert "Out of memory" in alone.stderr and "torchrun --nproc-per-node" in alone.stderr, alone.stderr
