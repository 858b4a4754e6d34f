"""The chunked head + cross-entropy equals logits -> per_token_loss: losses, hidden and head gradients, ignored
labels, per-token upstream weights, a frozen head (gradient formed in forward) and bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from tetra.train.chunked_loss import STORED_GRADIENT_BYTES, chunked_token_loss
from tetra.train.losses import per_token_loss


def _case(frozen: bool, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 50, 16, dtype=dtype, generator=generator).requires_grad_()
    weight = torch.randn(97, 16, dtype=dtype, generator=generator).requires_grad_(not frozen)
    labels = torch.randint(0, 97, (3, 50), generator=generator)
    labels[0, :7] = -100
    labels[2, -3:] = -100
    upstream = torch.rand(3, 50, dtype=dtype, generator=generator)
    return hidden, weight, labels, upstream


@pytest.mark.parametrize("frozen,stored_bytes", [(False, 0), (False, STORED_GRADIENT_BYTES), (True, 0)])
@pytest.mark.parametrize("chunk", [1, 13, 1024])
def test_equals_full_logits(frozen, stored_bytes, chunk):
    """A trained head is checked both ways: softmax - onehot kept by the forward pass, and recomputed (0 bytes)."""
    hidden, weight, labels, upstream = _case(frozen)
    losses = chunked_token_loss(hidden, weight, labels, chunk, stored_bytes)
    (losses * upstream).sum().backward()
    chunked = (hidden.grad.clone(), None if frozen else weight.grad.clone())
    hidden.grad = weight.grad = None
    reference = per_token_loss(hidden @ weight.t(), labels)
    (reference.double() * upstream).sum().backward()
    assert torch.allclose(losses.double(), reference.double(), atol=1e-6)
    assert bool((losses[labels == -100] == 0).all())
    assert torch.allclose(chunked[0], hidden.grad, atol=1e-6)
    if not frozen:
        assert torch.allclose(chunked[1], weight.grad, atol=1e-6)


def test_under_bf16_autocast_matches_the_linear_path():
    hidden, weight, labels, upstream = _case(frozen=True, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = chunked_token_loss(hidden, weight, labels)
    (losses * upstream).sum().backward()
    chunked = hidden.grad.clone()
    hidden.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = per_token_loss(torch.nn.functional.linear(hidden, weight), labels)
    (reference * upstream).sum().backward()
    assert torch.allclose(losses, reference, atol=2e-2, rtol=1e-2)
    assert torch.allclose(chunked, hidden.grad, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize("frozen", [False, True])
def test_no_gradient_work_without_autograd(frozen, monkeypatch):
    """Evaluation (no autograd) neither forms a frozen head's gradient nor keeps a trained head's softmax."""
    from tetra.train import chunked_loss

    kept = []
    original = chunked_loss._loss_and_gradient
    monkeypatch.setattr(chunked_loss, "_loss_and_gradient", lambda *args: kept.append(1) or original(*args))
    hidden, weight, labels, _ = _case(frozen=frozen)
    with torch.no_grad():
        losses = chunked_token_loss(hidden, weight, labels)
    assert losses.grad_fn is None and torch.allclose(losses.double(),
                                                     per_token_loss(hidden @ weight.t(), labels).double(), atol=1e-6)
    assert not kept
    chunked_token_loss(hidden, weight, labels).sum().backward()
    assert len(kept) == (0 if frozen else 1)


def test_only_trained_tokens_reach_the_head(monkeypatch):
    """Masked labels (prompts, padding) never get logits, and a batch with nothing to train gives zeros."""
    from tetra.train import chunked_loss

    seen = []
    original = chunked_loss._statistics
    monkeypatch.setattr(chunked_loss, "_statistics", lambda logits, *rest: seen.append(len(logits)) or
                        original(logits, *rest))
    hidden, weight, labels, _ = _case(frozen=True)
    chunked_token_loss(hidden, weight, labels).sum().backward()
    assert sum(seen) == int((labels != -100).sum()) < labels.numel()
    hidden.grad = None
    losses = chunked_token_loss(hidden, weight, torch.full_like(labels, -100))
    losses.sum().backward()
    assert bool((losses == 0).all()) and bool((hidden.grad == 0).all())


def test_cpu_chunks_keep_their_fp32_logits_small():
    """On CPU a chunk's fp32 [rows, vocabulary] buffer stays under 8 MiB (larger ones page-fault on every chunk);
    other devices take DEFAULT_CHUNK rows."""
    from tetra.train.chunked_loss import DEFAULT_CHUNK, chunk_rows

    cpu = torch.device("cpu")
    assert chunk_rows(8192, cpu) == 256 and chunk_rows(49152, cpu) == 42 and chunk_rows(97, cpu) == DEFAULT_CHUNK
    assert chunk_rows(10**7, cpu) == 16
    assert chunk_rows(49152, torch.device("meta")) == DEFAULT_CHUNK


@pytest.mark.parametrize("stored_bytes", [0, STORED_GRADIENT_BYTES])
def test_an_fp32_head_gets_an_fp32_gradient_under_autocast(stored_bytes):
    """The head's gradient comes back in the head's dtype, and no less accurate than nn.Linear's under the same
    autocast (whose bf16 GEMM rounds it once): summed over chunks in fp32, or out of one GEMM when kept."""
    hidden, weight, labels, upstream = _case(frozen=False, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = chunked_token_loss(hidden, weight, labels, chunk_tokens=13, stored_bytes=stored_bytes)
    (losses * upstream).sum().backward()
    chunked = weight.grad.clone()
    assert chunked.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = per_token_loss(torch.nn.functional.linear(hidden, weight), labels)
    (reference * upstream).sum().backward()
    exact_hidden, exact_weight = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    (per_token_loss(exact_hidden @ exact_weight.t(), labels) * upstream.double()).sum().backward()
    assert (chunked - exact_weight.grad).abs().max() <= (weight.grad - exact_weight.grad).abs().max()
    if stored_bytes == 0:  # summed over chunks in fp32, not rounded to bf16 on the way
        assert not torch.equal(chunked, chunked.bfloat16().float())


def test_a_frozen_head_runs_one_logits_gemm_per_chunk_in_forward():
    """LoRA's frozen head: the forward forms the hidden-state gradient from the logits it already has, so it costs
    two GEMMs of the head's size (logits, then the gradient times the head), not three."""
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight, labels, _ = _case(frozen=True)
    with FlopCounterMode(display=False) as counter:
        chunked_token_loss(hidden, weight, labels, chunk_tokens=13)
    tokens = int((labels != -100).sum())
    assert counter.get_total_flops() == 2 * (2 * tokens * weight.shape[0] * weight.shape[1])


@pytest.mark.parametrize("stored_bytes,gemms", [(STORED_GRADIENT_BYTES, 3), (0, 4)])
def test_a_trained_head_recomputes_logits_only_when_they_are_not_kept(stored_bytes, gemms):
    """Forward and backward of a trained head: logits, hidden gradient and head gradient (three GEMMs of the head's
    size) when softmax - onehot fits the budget; a fourth (the logits again) when it must be recomputed."""
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight, labels, _ = _case(frozen=False)
    with FlopCounterMode(display=False) as counter:
        chunked_token_loss(hidden, weight, labels, chunk_tokens=13, stored_bytes=stored_bytes).sum().backward()
    tokens = int((labels != -100).sum())
    assert counter.get_total_flops() == gemms * (2 * tokens * weight.shape[0] * weight.shape[1])
