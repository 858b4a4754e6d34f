"""keep_freed_memory: CPU training steps reuse their freed buffers instead of page-faulting fresh ones in, and the
call is a harmless no-op where it does not apply."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from tetra import devices
from tetra.devices import keep_freed_memory

# Training steps of a small model through the chunked loss, in a fresh process (the setting is process-wide and
# cannot be undone); prints the page faults per step after two warm-up steps.
STEPS = textwrap.dedent("""
    import resource, sys, torch
    from tetra.devices import keep_freed_memory
    from tetra.model import ModelConfig, Transformer
    from tetra.train.chunked_loss import chunked_token_loss
    if sys.argv[1] == "keep":
        assert keep_freed_memory(torch.device("cpu"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=8192, hidden_size=384, n_layers=2, n_heads=6, intermediate_size=1024,
                                    max_position_embeddings=256))
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    tokens = torch.randint(0, 8192, (8, 257))
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model(tokens[:, :-1], hidden_only=True)
            loss = chunked_token_loss(hidden, model.head.weight, tokens[:, 1:]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(2):
        step()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 3)
""")


def _faults_per_step(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=300,
                            check=True)
    return float(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_training_steps_stop_page_faulting_their_buffers_in():
    default = _faults_per_step("default")
    if default < 5000:
        pytest.skip(f"this C library already keeps freed memory ({default:.0f} page faults per step)")
    kept = _faults_per_step("keep")
    assert kept < default / 5, (kept, default)


def test_a_no_op_where_it_does_not_apply(monkeypatch):
    assert not keep_freed_memory(torch.device("meta"))  # GPUs (any non-CPU device) manage their own memory
    monkeypatch.setattr(devices.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    assert not keep_freed_memory(torch.device("cpu"))  # no glibc to tune
    monkeypatch.setattr(devices.sys, "platform", "darwin")
    assert not keep_freed_memory(torch.device("cpu"))
