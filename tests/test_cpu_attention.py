"""Training attention on CPU (bf16 flash forward, fp32 flash backward) against SDPA and an fp64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tetra.model.cpu_attention import training_attention
from tetra.model.kv_cache import dense_attention


def _inputs(kv_heads: int, length: int = 37):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, length, 16, generator=generator)
    k, v = (torch.randn(2, kv_heads, length, 16, generator=generator) for _ in range(2))
    grad = torch.randn(2, 4, length, 16, generator=generator)
    return q, k, v, grad


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_gradients_are_at_least_as_accurate_as_bf16_sdpa(kv_heads, causal):
    q, k, v, grad = _inputs(kv_heads)
    leaves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = training_attention(*leaves, causal)
    assert out is not None and out.dtype == torch.bfloat16
    out.backward(grad.bfloat16())
    ours = [leaf.grad for leaf in leaves]
    assert all(g.dtype == torch.bfloat16 for g in ours)
    sdpa_leaves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*sdpa_leaves, is_causal=causal, enable_gqa=kv_heads != 4)
    expected.backward(grad.bfloat16())
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*exact, is_causal=causal, enable_gqa=kv_heads != 4).backward(grad.double())
    assert torch.equal(out, expected)  # the same bf16 forward kernel
    for mine, bf16, reference in zip(ours, (t.grad for t in sdpa_leaves), (t.grad for t in exact), strict=True):
        assert (mine.double() - reference).abs().max() <= (bf16.double() - reference).abs().max() + 1e-3


def test_autocast_inputs_are_cast_and_other_cases_fall_back_to_sdpa():
    q, k, v, _ = _inputs(4)
    q32 = q.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert training_attention(q32, k, v.bfloat16(), True).dtype == torch.bfloat16
    assert training_attention(q32, k, v, True) is None  # fp32 without autocast: SDPA's fp32 kernel
    assert training_attention(q32.bfloat16(), k.bfloat16(), v, True) is None  # mixed dtypes: SDPA decides
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves fp64 alone, and so does this path
        assert training_attention(q.double().requires_grad_(), k.double(), v.double(), True) is None
    with torch.no_grad():
        assert training_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), True) is None
    mask = torch.ones(2, 1, 37, 37, dtype=torch.bool).tril()
    leaves = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    assert dense_attention(*leaves, mask).grad_fn.name().startswith("ScaledDotProduct")
    assert dense_attention(*leaves, None).grad_fn.name() == "_FlashAttentionFp32BackwardBackward"
