"""Running out of memory becomes one paragraph: what this grid needs per process (the planner's model), what a
process has, and the smallest grid that fits, as a command to run."""

from __future__ import annotations

import torch

from test_train import run_config
from tetra.train.memory_advice import is_out_of_memory, out_of_memory_error

MODEL = dict(vocab_size=512, hidden_size=256, n_layers=4, n_heads=4, intermediate_size=704)


def test_allocation_failures_are_recognized_and_others_are_not():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 1048576 bytes. Error code 12"))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_the_message_names_the_need_and_a_grid_that_fits(prepared_data, tmp_path, monkeypatch):
    config, explicit = run_config(prepared_data, tmp_path / "run", model=MODEL, train={"batch_size": 4})
    parameters = 16 * 4 * (256 * 256 * 4 + 3 * 256 * 704) + 2 * 16 * 512 * 256  # bytes of weights+grads+AdamW
    monkeypatch.setattr("tetra.train.memory_advice.memory_per_process", lambda device: parameters // 3)
    message = str(out_of_memory_error(config, explicit, torch.device("cpu"), world=1))
    assert message.startswith("Out of memory: training")
    assert "on 1 process(es) as data 1 x depth 1 x row 1 x col 1" in message
    assert "torchrun --nproc-per-node 4" in message  # a third of the need per process: 4 ranks, not 2
    assert "parallel.row=" in message and "parallel.auto = true" in message


def test_a_model_no_grid_can_hold_says_so(prepared_data, tmp_path, monkeypatch):
    config, explicit = run_config(prepared_data, tmp_path / "run", model=MODEL)
    monkeypatch.setattr("tetra.train.memory_advice.memory_per_process", lambda device: 1000)
    message = str(out_of_memory_error(config, explicit, torch.device("cpu"), world=1))
    assert "No grid of up to 4096 processes fits" in message
