"""Cross-entropy through the output head, chunk by chunk, so the full [tokens, vocabulary] logits never exist: the
forward pass keeps each token's loss and nothing of size vocabulary. With a 49k vocabulary and 2k tokens that is
0.4 GB of fp32 logits (and as much again for their gradient) that training no longer holds.

The gradient with respect to token i's hidden state is g_i * (softmax_i - onehot_i) W, where g_i is the upstream
gradient of token i's loss: a per-token scale. So when the head is frozen (LoRA), the forward pass computes
(softmax_i - onehot_i) W chunk by chunk, keeps that [tokens, width] matrix, and backward only scales it: no logits
are recomputed. When the head trains, backward recomputes each chunk's logits (one more head GEMM) to form both
gradients.

Only tokens with a label go through the head (chat data masks prompts and padding, often most of a batch).

Entry point: chunked_token_loss(hidden [..., d], weight [V, d], labels [...], chunk_tokens) -> per-token losses.
"""

from __future__ import annotations

import torch

from tetra.data.batch import IGNORE_INDEX

DEFAULT_CHUNK = 1024


def _chunk_loss(piece: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token losses, fp32 log-probabilities) of one chunk; 0 loss where the label is ignored."""
    log_probabilities = torch.log_softmax(piece @ weight.t(), dim=-1, dtype=torch.float32)
    picked = log_probabilities.gather(1, target.clamp(min=0)[:, None])[:, 0]
    return torch.where(target != IGNORE_INDEX, -picked, 0.0), log_probabilities


def _logit_gradient(log_probabilities: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """(softmax - onehot) per row, times the row's scale (0 for ignored labels), in the GEMM dtype; in place."""
    probabilities = log_probabilities.exp_()
    probabilities[torch.arange(len(target), device=target.device), target.clamp(min=0)] -= 1.0
    kept = (target != IGNORE_INDEX).float()
    probabilities.mul_((kept if scale is None else kept * scale.float())[:, None])
    return probabilities.to(dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                eager_gradient: bool) -> torch.Tensor:
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        unscaled = torch.empty_like(hidden) if eager_gradient else None
        for start in range(0, hidden.shape[0], chunk):
            target = labels[start:start + chunk]
            losses[start:start + chunk], log_probabilities = _chunk_loss(hidden[start:start + chunk], weight, target)
            if unscaled is not None:
                unscaled[start:start + chunk] = _logit_gradient(log_probabilities, target, None, hidden.dtype) @ weight
        ctx.eager_gradient, ctx.chunk = eager_gradient, chunk
        ctx.save_for_backward(*((unscaled,) if eager_gradient else (hidden, weight, labels)))
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        if ctx.eager_gradient:
            (unscaled,) = ctx.saved_tensors
            return (unscaled.float() * grad_losses[:, None]).to(unscaled.dtype), None, None, None, None
        hidden, weight, labels = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            piece, target = hidden[start:start + ctx.chunk], labels[start:start + ctx.chunk]
            _, log_probabilities = _chunk_loss(piece, weight, target)
            grad_logits = _logit_gradient(log_probabilities, target, grad_losses[start:start + ctx.chunk],
                                          hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + ctx.chunk] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ piece).float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def chunked_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       chunk_tokens: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per-token cross-entropy of the head `weight` applied to `hidden`, shaped like labels. Under autocast the
    head GEMMs run in the autocast dtype (as nn.Linear would), the softmax in fp32."""
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    eager = torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
    hidden, labels_flat = hidden.flatten(0, -2), labels.flatten()
    trained = (labels_flat != IGNORE_INDEX).nonzero()[:, 0]
    if len(trained) == len(labels_flat):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels_flat, chunk_tokens, eager).view(labels.shape)
    # Only trained tokens go through the head: in chat data most labels are masked (prompts, padding), and their
    # logits would be computed only to be multiplied by zero. The others' losses (and gradients) are exactly 0.
    picked = _ChunkedLinearCrossEntropy.apply(hidden.index_select(0, trained), weight, labels_flat[trained],
                                              chunk_tokens, eager)
    losses = picked.new_zeros(len(labels_flat)).index_copy(0, trained, picked)
    return losses.view(labels.shape)
