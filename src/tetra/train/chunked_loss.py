"""Cross-entropy through the output head, chunk by chunk, so the full [tokens, vocabulary] logits never exist: the
forward pass keeps each token's loss and nothing of size vocabulary. With a 49k vocabulary and 2k tokens that is
0.4 GB of fp32 logits (and as much again for their gradient) that training no longer holds.

The gradient with respect to token i's hidden state is g_i * (softmax_i - onehot_i) W, where g_i is the upstream
gradient of token i's loss: a per-token scale. So when the head is frozen (LoRA), the forward pass computes
(softmax_i - onehot_i) W chunk by chunk, keeps that [tokens, width] matrix, and backward only scales it: no logits
are recomputed. When the head trains, backward recomputes each chunk's logits (one more head GEMM) to form both
gradients.

When the head trains and softmax - onehot of every token fits STORED_GRADIENT_BYTES (in the GEMM dtype: 32 MiB
for 2048 tokens of an 8k vocabulary in bf16), the forward pass keeps it, as for a frozen head: backward is then
two whole-batch GEMMs, with no logits recomputed, no softmax and one head gradient written once instead of summed
chunk by chunk in fp32 (the head's weight gradient comes out of one GEMM, as nn.Linear's does).

Only tokens with a label go through the head (chat data masks prompts and padding, often most of a batch).

Speed: the forward keeps each token's log-normalizer (logsumexp), so backward forms softmax - onehot with one
softmax kernel in the GEMM dtype (bf16 under autocast: the fp32 softmax rounded once, as a cast would) and fixes
the target column in fp32; the per-token scale multiplies the [tokens, width] GEMM operands and results, not the
[tokens, vocabulary] matrix. On CPU a chunk's fp32 buffers stay under 8 MiB: glibc serves 32 MiB and larger
allocations from fresh pages every time, and those page faults cost more than the softmax itself.

Entry point: chunked_token_loss(hidden [..., d], weight [V, d], labels [...], chunk_tokens) -> per-token losses.
"""

from __future__ import annotations

import torch

from tetra.data.batch import IGNORE_INDEX

DEFAULT_CHUNK = 1024
CPU_CHUNK_BYTES = 8 * 2**20  # one chunk's [rows, vocabulary] buffer, on CPU
STORED_GRADIENT_BYTES = 64 * 2**20  # softmax - onehot of all tokens kept by the forward pass, at most


def chunk_rows(vocabulary: int, device: torch.device, itemsize: int = 4) -> int:
    """Tokens per chunk: DEFAULT_CHUNK, or on CPU as many as keep a chunk's [rows, vocabulary] buffer of
    `itemsize`-byte values under CPU_CHUNK_BYTES (fp32 statistics in the forward pass; the backward pass works in
    the GEMM dtype, so under bf16 its chunks hold twice the rows and the head gradient is summed half as often)."""
    if device.type != "cpu":
        return DEFAULT_CHUNK
    return max(16, min(DEFAULT_CHUNK, CPU_CHUNK_BYTES // (itemsize * vocabulary)))


def _statistics(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token losses, log-normalizers) of one chunk's logits, in fp32 (fp64 for fp64 logits)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    picked = torch.log_softmax(logits, dim=-1, dtype=dtype).gather(1, target[:, None])[:, 0]
    target_logits = logits.gather(1, target[:, None])[:, 0].to(dtype)
    return -picked, target_logits - picked


def _softmax_minus_onehot(logits: torch.Tensor, target: torch.Tensor,
                          log_normalizers: torch.Tensor) -> torch.Tensor:
    """softmax - onehot of one chunk's logits, unscaled, in the logits' (the GEMM's) dtype."""
    target_logits = logits.gather(1, target[:, None])[:, 0].to(log_normalizers.dtype)
    gradient = torch.softmax(logits, dim=-1)
    # The target column in fp32 before its one rounding: p - 1 loses every bit of p near 1 once p is rounded.
    _write_target_column(gradient, target, torch.exp(target_logits - log_normalizers) - 1.0)
    return gradient


def _write_target_column(gradient: torch.Tensor, target: torch.Tensor, values: torch.Tensor) -> None:
    """gradient[i, target[i]] = values[i], through a flat index: scatter_ along dim 1 walks the whole chunk on CPU
    (0.5 ms per 256 x 8192)."""
    flat_target = torch.arange(0, gradient.numel(), gradient.shape[1], device=target.device) + target
    gradient.view(-1).index_copy_(0, flat_target, values.to(gradient.dtype))


def _loss_and_gradient(logits: torch.Tensor, target: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Per-token losses of one chunk (fp32 statistics), writing its softmax - onehot into `gradient` (the GEMM
    dtype, each value rounded once from fp32; the target column formed in fp32, as in _softmax_minus_onehot)."""
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    picked = log_probs.gather(1, target[:, None])[:, 0]
    torch.exp(log_probs, out=gradient)
    _write_target_column(gradient, target, picked.exp() - 1.0)
    return -picked


_NO_GRADIENTS = (None,) * 8  # forward's eight inputs


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token losses of labelled tokens (labels never IGNORE_INDEX here) through the head, chunk by chunk. The
    GEMMs run in `dtype`; the gradients come back in the inputs' own dtypes. An fp32 head's gradient is one GEMM's
    result converted (kept softmax - onehot, rounded once to the GEMM dtype, as nn.Linear's), or, recomputed chunk
    by chunk, the chunks' products summed in fp32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                backward_chunk: int, eager_gradient: bool, dtype: torch.dtype, keep: bool) -> torch.Tensor:
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        statistics_dtype = torch.promote_types(dtype, torch.float32)
        losses = torch.empty(hidden.shape[0], dtype=statistics_dtype, device=hidden.device)
        log_normalizers = torch.empty_like(losses)
        unscaled = torch.empty_like(hidden) if eager_gradient else None
        stored = torch.empty(hidden.shape[0], weight.shape[0], dtype=dtype, device=hidden.device) if keep else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = hidden[rows] @ weight.t()
            if stored is not None:
                losses[rows] = _loss_and_gradient(logits, labels[rows], stored[rows])
                continue
            losses[rows], log_normalizers[rows] = _statistics(logits, labels[rows])
            if unscaled is not None:
                unscaled[rows] = _softmax_minus_onehot(logits, labels[rows], log_normalizers[rows]) @ weight
        ctx.eager_gradient, ctx.chunk, ctx.stored = eager_gradient, backward_chunk, stored is not None
        if stored is not None:
            ctx.save_for_backward(hidden, weight, stored)
        else:
            ctx.save_for_backward(*((unscaled,) if eager_gradient else (hidden, weight, labels, log_normalizers)))
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        if ctx.eager_gradient:
            (unscaled,) = ctx.saved_tensors
            return (unscaled.float() * grad_losses[:, None]).to(ctx.hidden_dtype), *_NO_GRADIENTS[1:]
        if ctx.stored:
            return _stored_backward(ctx, grad_losses)
        hidden, weight, labels, log_normalizers = ctx.saved_tensors
        grad_hidden = torch.empty(hidden.shape, dtype=ctx.hidden_dtype, device=hidden.device) \
            if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        # A narrow GEMM dtype's chunk products land in one reused buffer (no fresh [vocabulary, width] allocation
        # per chunk) and are converted as they are added to the fp32 sum; an fp32 GEMM adds in place (addmm_).
        product = torch.empty_like(weight) if grad_weight is not None and weight.dtype != torch.float32 else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            piece, scale = hidden[rows], grad_losses[rows].float()[:, None]
            grad_logits = _softmax_minus_onehot(piece @ weight.t(), labels[rows], log_normalizers[rows])
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ weight).float() * scale
            if grad_weight is None:
                continue
            scaled_piece = (piece.float() * scale).to(piece.dtype)
            if product is None:
                grad_weight.addmm_(grad_logits.t(), scaled_piece)
            else:
                grad_weight += torch.mm(grad_logits.t(), scaled_piece, out=product)
        grad_weight = None if grad_weight is None else grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, *_NO_GRADIENTS[2:]


def _stored_backward(ctx: torch.autograd.function.FunctionCtx,
                     grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients from the kept softmax - onehot: one GEMM for the hidden states, one for the head; the per-token
    scale applied in fp32 (fp64 for fp64 inputs)."""
    hidden, weight, stored = ctx.saved_tensors
    wide = torch.promote_types(stored.dtype, torch.float32)
    scale = grad_losses.to(wide)[:, None]
    grad_hidden = ((stored @ weight).to(wide) * scale).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
    grad_weight = torch.mm(stored.t(), (hidden.to(wide) * scale).to(hidden.dtype)).to(ctx.weight_dtype)
    return grad_hidden, grad_weight, *_NO_GRADIENTS[2:]


def chunked_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       chunk_tokens: int | None = None, stored_bytes: int = STORED_GRADIENT_BYTES) -> torch.Tensor:
    """Per-token cross-entropy of the head `weight` applied to `hidden`, shaped like labels. Under autocast the
    head GEMMs run in the autocast dtype (as nn.Linear would), the softmax statistics in fp32. chunk_tokens: tokens
    per chunk (default: chunk_rows). stored_bytes: the most a trained head's forward pass may keep of
    softmax - onehot to skip recomputing it (0: always recompute, the least memory); a budget per call, so two
    calls before one backward (the progressive loss) may hold two. The speed-up is measured on CPU only."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    chunk = chunk_tokens or chunk_rows(weight.shape[0], hidden.device)
    backward_chunk = chunk_tokens or chunk_rows(weight.shape[0], hidden.device, dtype.itemsize)
    eager = torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
    hidden, labels_flat = hidden.flatten(0, -2), labels.flatten()
    trained = (labels_flat != IGNORE_INDEX).nonzero()[:, 0]
    # Kept only for a head that trains (not in evaluation, not for a frozen head) and within the budget.
    keep = torch.is_grad_enabled() and weight.requires_grad and \
        0 < len(trained) * weight.shape[0] * dtype.itemsize <= stored_bytes
    if len(trained) == len(labels_flat):
        losses = _ChunkedLinearCrossEntropy.apply(hidden, weight, labels_flat, chunk, backward_chunk, eager, dtype,
                                                  keep)
        return losses.view(labels.shape)
    # Only trained tokens go through the head: in chat data most labels are masked (prompts, padding), and their
    # logits would be computed only to be multiplied by zero. The others' losses (and gradients) are exactly 0.
    picked = _ChunkedLinearCrossEntropy.apply(hidden.index_select(0, trained), weight, labels_flat[trained],
                                              chunk, backward_chunk, eager, dtype, keep)
    losses = picked.new_zeros(len(labels_flat)).index_copy(0, trained, picked)
    return losses.view(labels.shape)
