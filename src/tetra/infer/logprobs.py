"""Log-probabilities of tokens under a model: each chosen token's and the k most likely alternatives, as the
OpenAI `logprobs` field and lm-eval's scoring need them.

Entry points: TokenLogprob, logprobs_of(logits, tokens, top), prompt_logprobs(model, hidden, ids, top).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tetra.model import Transformer

# Positions scored per head application, so a long prompt never holds [T, vocab] fp32 logits at once.
PROMPT_CHUNK = 256


@dataclass(frozen=True)
class TokenLogprob:
    """log p(token) under the model's own distribution (before temperature or top-p), and the top alternatives."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """For logits [N, vocab] and the tokens [N] that followed them: one TokenLogprob per row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0].tolist()
    if top <= 0:
        return [TokenLogprob(value) for value in chosen]
    best = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
    values, ids = best.values.tolist(), best.indices.tolist()
    return [TokenLogprob(value, tuple(zip(row_ids, row_values, strict=True)))
            for value, row_ids, row_values in zip(chosen, ids, values, strict=True)]


def prompt_logprobs(model: Transformer, hidden: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it (None for the first), from the final hidden
    states [T, hidden] of one forward pass, applying the head a chunk at a time."""
    targets = torch.tensor(ids[1:], dtype=torch.long, device=hidden.device)
    scored: list[TokenLogprob | None] = [None]
    for start in range(0, len(ids) - 1, PROMPT_CHUNK):
        end = min(start + PROMPT_CHUNK, len(ids) - 1)
        scored += logprobs_of(model.head(hidden[start:end]), targets[start:end], top)
    return scored
