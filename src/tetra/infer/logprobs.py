"""Log-probabilities of tokens under a model: each chosen token's and the k most likely alternatives, as the
OpenAI `logprobs` field and lm-eval's scoring need them.

Entry points: TokenLogprob, logprobs_of(logits, tokens, top), prompt_logprobs(model, hidden, ids, top),
target_logprobs(model, hidden, targets), right_pad(sequences, device).
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


def target_logprobs(model: Transformer, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """log p(targets[i]) from hidden states [N, hidden] that predict them, and whether each is the argmax
    (all of them: greedy decoding would have produced the targets)."""
    logits = model.head(hidden).float()
    chosen = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
    return chosen, bool((logits.argmax(-1) == targets).all())


def right_pad(sequences: list[list[int]], device: torch.device | str) -> torch.Tensor:
    """Token lists left-aligned in one [B, longest] tensor, zero-padded on the right: under causal attention the
    padding never reaches a real position, so no mask is needed."""
    batch = torch.zeros((len(sequences), max(len(ids) for ids in sequences)), dtype=torch.long, device=device)
    for row, ids in enumerate(sequences):
        batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return batch
