"""Training attention on CPU: torch's flash-attention kernel forward in the autocast dtype, its backward in fp32.

On CPU the bf16 backward of torch's flash kernel is slower than its fp32 backward (12-14 ms against 9.5-11 ms per
layer of the throughput benchmark's shape, 8 x 6 heads x 256 x 64, conversions included), so the forward runs in bf16
as autocast's SDPA would, and the backward converts the saved bf16 tensors and the incoming gradient to fp32 and
calls the fp32 kernel. The gradients are no further from an fp64 reference than the bf16 kernel's (within 1e-3 in
the test, closer in most entries), and are handed back in the inputs' dtype.

Entry point: training_attention(q, k, v, causal) or None when the case is not one this path takes.
"""

from __future__ import annotations

import torch

_REDUCED = (torch.bfloat16, torch.float16)


class _FlashAttentionFp32Backward(torch.autograd.Function):
    """Flash attention (no mask, no dropout) of q [B, H, T, D] over k, v [B, Hkv, S, D]."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        out, log_normalizers = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=causal)
        ctx.causal = causal
        ctx.save_for_backward(q, k, v, out, log_normalizers)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, out, log_normalizers = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.float(), q.float(), k.float(), v.float(), out.float(), log_normalizers, 0.0, ctx.causal)
        return *(gradient.to(tensor.dtype) for gradient, tensor in zip(grads, (q, k, v), strict=True)), None


def training_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor | None:
    """Attention through the fp32-backward path when it applies (CPU, autograd recording, a reduced-precision
    compute dtype, eager); None otherwise, and the caller runs SDPA. Under autocast fp32 inputs are cast to the
    autocast dtype first, as SDPA under autocast would cast them; other mixes of dtypes are left to SDPA."""
    if q.device.type != "cpu" or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if not (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if autocast else q.dtype
    castable = (dtype, torch.float32) if autocast else (dtype,)
    if dtype not in _REDUCED or any(t.dtype not in castable for t in (q, k, v)):
        return None
    return _FlashAttentionFp32Backward.apply(q.to(dtype), k.to(dtype), v.to(dtype), causal)
