"""Recurrent depth (Geiping et al. 2025): a prelude embeds the input, a core block stack is iterated r times on a
latent state, and a coda reads the result out, so test-time compute grows with r and no parameter is added.

    e = prelude(x);  s_0 ~ TruncNormal(0, sqrt(2 / (5h))) * sqrt(h) in training (0 in evaluation)
    s_i = core(adapter([s_{i-1}; e]))   for i = 1 .. r
    y = coda(s_r)

Every block is a sandwich block: x = norm(attn(norm x) + x), then x = norm(mlp(norm x) + x). The adapter is two
h x h matrices (one for the state, one for the injected input), the same map as one Linear over [s; e].

Training picks r per forward (train/recurrence.py samples it) and backpropagates through the last
`backprop_depth` iterations only. Inference takes any r, or stops once the output distribution of successive
iterations moves less than `exit_kl` (KL divergence at the last position, for every row of the batch).

KV cache: the core has `recurrent_cache_slots` slots; iteration i writes and reads slot i mod slots. With at least
r slots, cached decoding equals a full recompute; with fewer (default 1) the cache does not grow with r, and a token
sees the previous tokens' keys from their last iteration (the paper's KV-cache sharing).

Entry points: SandwichBlock, RecurrentDepth, run_recurrent(model, x, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tetra.model.config import ModelConfig
from tetra.model.layers import Block, make_norm


class SandwichBlock(Block):
    """A block with a norm after each residual sum too, which keeps an iterated state's scale fixed."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__(config, layer_index)
        self.attn_post_norm = make_norm(config)
        self.mlp_post_norm = make_norm(config)

    def forward(self, x: torch.Tensor, rotary, mask, kv_cache=None, cache_start: int = 0) -> torch.Tensor:
        x = self.attn_post_norm(self.attn(self.attn_norm(x), rotary, mask, kv_cache, cache_start) + x)
        return self.mlp_post_norm(self.mlp(self.mlp_norm(x)) + x)


class RecurrentDepth(nn.Module):
    """The adapter that merges the state with the injected input, and the shape of the recurrence."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.prelude, self.core, self.coda = config.recurrent_prelude, config.recurrent_core, config.recurrent_coda
        self.slots = config.recurrent_cache_slots
        self.state = nn.Linear(hidden, hidden, bias=False)  # adapter columns that see the state ...
        self.inject = nn.Linear(hidden, hidden, bias=False)  # ... and those that see the prelude's output
        self.state_std, self.state_scale = math.sqrt(2 / (5 * hidden)), math.sqrt(hidden)
        # A grid-split model holds a column slice of the state (parallelize sets these): the state is drawn whole
        # and cut, so every rank of a row group draws the same values and the columns stay independent.
        self.width_parts, self.width_index = 1, 0

    def initial_state(self, like: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return torch.zeros_like(like)
        state = torch.empty((*like.shape[:-1], like.shape[-1] * self.width_parts), dtype=like.dtype,
                            device=like.device)
        nn.init.trunc_normal_(state, std=self.state_std, a=-3 * self.state_std, b=3 * self.state_std)
        return state.chunk(self.width_parts, -1)[self.width_index] * self.state_scale


class _CacheSlot:
    """The KV cache as one core iteration sees it: block layer k is the cache's layer k + offset."""

    def __init__(self, cache, offset: int) -> None:
        self.cache, self.offset = cache, offset

    def attend(self, layer: int, q, keys, values, mask, start: int):
        return self.cache.attend(layer + self.offset, q, keys, values, mask, start)


def _slot(cache, offset: int):
    return None if cache is None else (cache if offset == 0 else _CacheSlot(cache, offset))


def _kl(previous: torch.Tensor, current: torch.Tensor) -> float:
    """Largest KL(current || previous) over the rows, at the last position (the one the next token is sampled
    from) of logits [B, T, vocab]."""
    log_now, log_before = F.log_softmax(current[:, -1].float(), -1), F.log_softmax(previous[:, -1].float(), -1)
    return float((log_now.exp() * (log_now - log_before)).sum(-1).max())


def run_recurrent(blocks: nn.ModuleList, recurrence: RecurrentDepth, x: torch.Tensor, rotary, mask, kv_cache,
                  cache_start: int, steps: int, backprop_depth: int, exit_kl: float = 0.0,
                  readout: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  stats: dict | None = None, initial_state: torch.Tensor | None = None) -> torch.Tensor:
    """Prelude, `steps` core iterations (gradient through the last backprop_depth), coda; the coda's output.
    exit_kl > 0 (with readout: hidden -> logits) stops early once successive iterations' outputs agree; stats,
    if given, receives the iterations run."""
    prelude = blocks[:recurrence.prelude]
    core = blocks[recurrence.prelude:recurrence.prelude + recurrence.core]
    coda = blocks[recurrence.prelude + recurrence.core:]
    for block in prelude:
        x = block(x, rotary, mask, kv_cache, cache_start)
    injected = x
    state = recurrence.initial_state(x) if initial_state is None else initial_state
    coda_cache = _slot(kv_cache, (recurrence.slots - 1) * recurrence.core)
    previous_logits, out, done = None, None, 0
    for step in range(steps):
        tracked = torch.is_grad_enabled() and step >= steps - backprop_depth
        with torch.set_grad_enabled(tracked):
            state = recurrence.state(state) + recurrence.inject(injected)
            core_cache = _slot(kv_cache, (step % recurrence.slots) * recurrence.core)
            for block in core:
                state = block(state, rotary, mask, core_cache, cache_start)
        done = step + 1
        if exit_kl > 0 and readout is not None and step < steps - 1:
            out = _coda(coda, state, rotary, mask, coda_cache, cache_start)
            logits = readout(out)
            if previous_logits is not None and _kl(previous_logits, logits) < exit_kl:
                break
            previous_logits, out = logits, None
    if stats is not None:
        stats["steps"] = done
    return out if out is not None else _coda(coda, state, rotary, mask, coda_cache, cache_start)


def _coda(coda: nn.ModuleList, state: torch.Tensor, rotary, mask, cache, cache_start: int) -> torch.Tensor:
    for block in coda:
        state = block(state, rotary, mask, cache, cache_start)
    return state
