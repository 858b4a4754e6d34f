"""Perplexity of a model on prepared data or text, with a sliding window for documents longer than the context:
each window scores the next tokens not scored before, so every token is predicted once, from at least
max(1, context - stride) tokens of history (stride = context: windows overlap by the one token that predicts the
next window's first, as lm-eval's rolling windows do; the fastest).

Entry points: document_nll(model, ids, context, stride) -> (nll sum, tokens), perplexity_of(...) -> Perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch

from tetra.errors import ConfigError
from tetra.infer.logprobs import right_pad, target_logprobs
from tetra.model import Transformer

# Windows scored in one forward pass (they have equal length except a document's last).
WINDOW_BATCH = 8


@dataclass
class Perplexity:
    """Totals over every scored token; bits_per_byte only when the texts (and so their bytes) are known."""

    documents: int
    tokens: int
    nll: float  # mean negative log-likelihood per token, nats
    perplexity: float
    bits_per_byte: float | None = None
    context: int = 0
    stride: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def windows(length: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first scored position) per window over a document of `length` tokens; position 0 is never
    scored (nothing predicts it)."""
    history = max(1, context - stride)
    begin, first = 0, 1
    while first < length:
        end = min(begin + context, length)
        yield begin, end, first
        first = end
        begin = end - history


@torch.inference_mode()
def document_nll(model: Transformer, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] and how many tokens that is."""
    device = model.embed.weight.device
    spans = list(windows(len(ids), context, stride))
    total, count = 0.0, 0
    for start in range(0, len(spans), WINDOW_BATCH):
        group = spans[start : start + WINDOW_BATCH]
        batch = right_pad([ids[begin:end] for begin, end, _ in group], device)
        hidden = model(batch, hidden_only=True)
        for row, (begin, end, first) in enumerate(group):
            scores, _ = target_logprobs(model, hidden[row, first - 1 - begin : end - 1 - begin],
                                        batch[row, first - begin : end - begin])
            total -= scores.sum().item()
            count += len(scores)
    return total, count


def perplexity_of(model: Transformer, documents: Iterable[list[int]], context: int | None = None,
                  stride: int | None = None, total_bytes: int | None = None,
                  on_document=None) -> Perplexity:
    """Perplexity over token documents; context defaults to the model's, stride to half the context."""
    context = context or model.config.max_position_embeddings
    stride = stride or max(1, context // 2)
    if context < 2 or not 1 <= stride <= context:
        raise ConfigError(f"--stride must lie in [1, context] and the context ({context}) must be at least 2 "
                          f"(got stride {stride}).")
    if context > model.config.max_position_embeddings:
        raise ConfigError(f"--context {context} exceeds the model's {model.config.max_position_embeddings} "
                          "positions; lower it.")
    nll, tokens, count = 0.0, 0, 0
    for ids in documents:
        document_total, document_tokens = document_nll(model, ids, context, stride)
        nll, tokens, count = nll + document_total, tokens + document_tokens, count + 1
        if on_document:
            on_document()
    if tokens == 0:
        raise ConfigError("No token could be scored: every document has fewer than two tokens.")
    mean = nll / tokens
    bits = nll / math.log(2) / total_bytes if total_bytes else None
    return Perplexity(count, tokens, mean, math.exp(mean), bits, context, stride)
