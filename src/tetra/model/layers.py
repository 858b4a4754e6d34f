"""The transformer's building blocks: norms, rotary positions, attention (torch SDPA) and MLPs.

Entry points: make_norm, RotaryEmbedding, Attention, MLP, Block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tetra.model.config import ModelConfig, RopeScaling
from tetra.model.kv_cache import KVCache, dense_attention


class _TrainingRMSNorm(torch.autograd.Function):
    """RMSNorm for training on CPU, written straight in the dtype the next GEMM reads (bf16 under autocast): three
    passes over x forward (torch's CPU rms_norm is composite: five, and autocast's cast a sixth) and six backward, two
    of them matrix-vector products (the weight gradient is rstd^T (g * x), the correction term (g * x) w), against
    about twice as many for autograd through the composite and its cast. Math in x's dtype (fp32 or fp64), one
    rounding at the end: 1.9 against 3.0 ms per call forward + backward at 2048 x 384 on the 2-core CI machine."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
        width = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(width).add_(eps).rsqrt_()
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        torch.mul(x * rstd, weight, out=out)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight, rstd = ctx.saved_tensors
        width = x.shape[-1]
        flat_x, flat_grad, flat_rstd = x.reshape(-1, width), grad.reshape(-1, width), rstd.reshape(-1)
        grad_times_x = flat_grad * flat_x
        grad_weight = flat_rstd @ grad_times_x if ctx.needs_input_grad[1] else None  # x's dtype is the weight's
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None, None
        # d/dx of x * rstd * w: rstd * g * w - x * rstd^3 * <g * x, w> / width
        correction = (grad_times_x @ weight).mul_(flat_rstd.pow(3)).div_(width)
        grad_x = (flat_grad * weight).mul_(flat_rstd[:, None]).addcmul_(flat_x, correction[:, None], value=-1)
        return grad_x.view(x.shape), grad_weight, None, None


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (as Llama does) and cast back to the input dtype. feeds_projection:
    the output is only read by projections (a pre-norm), so in training under autocast an fp32 input's norm is
    returned in the autocast dtype directly, the one cast those projections would make; a norm whose output is
    the residual stream (a sandwich block's post-norm) or the final hidden state keeps the input's dtype."""

    def __init__(self, width: int, eps: float, feeds_projection: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps
        self.feeds_projection = feeds_projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CPU only: torch's CPU rms_norm is composite, while CUDA builds have a fused kernel (GPUs not measured
        # here); compiled, the composite fuses.
        if (x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
                and x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.float64)
                and not torch.compiler.is_compiling()):
            narrow = self.feeds_projection and x.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
            return _TrainingRMSNorm.apply(x, self.weight, self.eps,
                                          torch.get_autocast_dtype("cpu") if narrow else x.dtype)
        if x.dtype == torch.float32:  # one call into torch's rms_norm: fewer Python ops on the decode hot path
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: ModelConfig, feeds_projection: bool = False) -> nn.Module:
    """The norm the family uses: RMSNorm, or LayerNorm with a bias (feeds_projection: see RMSNorm)."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps, feeds_projection)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Rotary inverse frequencies in fp32, with linear or Llama-3 scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type != "llama3":
        return inv_freq
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
    original = scaling.original_max_position_embeddings
    low_freq_wavelength = original / scaling.low_freq_factor
    high_freq_wavelength = original / scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
    smooth = (original / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    in_band = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return torch.where(in_band, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin tables for given positions; holds no parameters and nothing in the state dict."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # A plain attribute, not a buffer: it must stay fp32 when the model is cast to bf16, and it must not be
        # created on the meta device when a model is built empty for loading.
        self.inv_freq = rope_inverse_frequencies(config.resolved_head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(position_ids.device)
        angles = position_ids.float()[..., None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_low: torch.Tensor, sin_high: torch.Tensor) -> torch.Tensor:
    """x * cos plus the half-swap of x times sin: the low half gets - x_high * sin_low, the high half
    + x_low * sin_high, written into halves of the output (no negated copy, no concatenation). Each product is
    rounded before its sum, as transformers' textbook form rounds it (a fused multiply-add would differ in the
    last bit, and a 30-layer model's logits by 3e-5), so the results are bit-identical to it."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin_low
    out[..., half:] += x[..., :half] * sin_high
    return out


def _rotate_for_training(x: torch.Tensor, cos: torch.Tensor, sin_low: torch.Tensor,
                         sin_high: torch.Tensor) -> torch.Tensor:
    """_rotate in the wider of x's and the tables' dtypes (fp32 for bf16 activations under autocast, as the
    mixed-dtype products promote): x is converted once and each half's product and sum is one fused multiply-add,
    three passes where _rotate's mixed-dtype products take seven with their converted copies (the sum's last bit
    may differ from _rotate's, which inference keeps bit-identical to transformers)."""
    half = x.shape[-1] // 2
    wide = x.to(torch.promote_types(x.dtype, cos.dtype))
    out = wide * cos
    out[..., :half].addcmul_(wide[..., half:], sin_low, value=-1)
    out[..., half:].addcmul_(wide[..., :half], sin_high)
    return out


class _Rotary(torch.autograd.Function):
    """Rotary positions with a hand-written backward: the rotation's transpose is the rotation by -angle, so the
    gradient is computed like the forward and autograd keeps only cos and sin (no copies of x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        ctx.save_for_backward(cos, sin)
        return _rotate_for_training(x, cos, sin[..., :half], sin[..., half:])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        return _rotate_for_training(grad, cos, -sin[..., half:], -sin[..., :half]), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, D] by position (the half-split convention Llama checkpoints are stored in); cos and sin are
    [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]
    if torch.compiler.is_compiling():  # the textbook form, which the compiler fuses into one kernel each way
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
    if torch.is_grad_enabled() and x.requires_grad and not (cos.requires_grad or sin.requires_grad):
        return _Rotary.apply(x, cos, sin)
    half = x.shape[-1] // 2  # no gradient, or differentiable tables: autograd follows _rotate itself
    return _rotate(x, cos, sin[..., :half], sin[..., half:])


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype, once: the projections that share x then share one cast copy, which autograd saves
    once for their weight gradients instead of once per projection (bit-identical results)."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional rotary positions and a KV cache."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads = config.n_heads, config.kv_heads
        self.head_dim = config.resolved_head_dim
        self.dropout = config.dropout
        hidden = config.hidden_size
        self.q = nn.Linear(hidden, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o = nn.Linear(self.n_heads * self.head_dim, hidden, bias=config.out_bias)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        x = autocast_input(x)
        q = self.q(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None:  # the cache decides which keys each query sees (an attention policy may)
            out = kv_cache.attend(self.layer_index, q, k, v, mask, cache_start)
        else:
            out = dense_attention(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))


ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    """Gated (SwiGLU: down(act(gate x) * up x)) or plain (down(act(up x))) feed-forward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, width = config.hidden_size, config.mlp_width
        self.activation = ACTIVATIONS[config.activation]
        self.gate = nn.Linear(hidden, width, bias=config.mlp_bias) if config.gated_mlp else None
        self.up = nn.Linear(hidden, width, bias=config.mlp_bias)
        self.down = nn.Linear(width, hidden, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        if self.gate is None:
            return self.down(self.activation(self.up(x)))
        return self.down(self.activation(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config, feeds_projection=True)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = make_norm(config, feeds_projection=True)
        self.mlp = MLP(config)
        # No dropout module at p = 0: two fewer calls per block on the decode hot path.
        self.residual_dropout = nn.Dropout(config.dropout) if config.dropout else None

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        attended = self.attn(self.attn_norm(x), rotary, mask, kv_cache, cache_start)
        if self.residual_dropout is not None:
            attended = self.residual_dropout(attended)
        x = x + attended
        transformed = self.mlp(self.mlp_norm(x))
        if self.residual_dropout is not None:
            transformed = self.residual_dropout(transformed)
        return x + transformed
