"""Recurrent depth (Geiping et al. 2025): a prelude embeds the input, a core block stack is iterated r times on a
latent state, and a coda reads the result out, so test-time compute grows with r and no parameter is added.

    e = prelude(x);  s_0 ~ TruncNormal(0, sqrt(2 / (5h))) * sqrt(h) in training (0 in evaluation)
    s_i = core(adapter([s_{i-1}; e]))   for i = 1 .. r
    y = coda(s_r)

Every block is a sandwich block: x = norm(attn(norm x) + x), then x = norm(mlp(norm x) + x). The adapter is two
h x h matrices (one for the state, one for the injected input), the same map as one Linear over [s; e].

Training picks r per forward (train/recurrence.py samples it) and backpropagates through the last
`backprop_depth` iterations only. Inference takes any r, or stops each sequence once its output distribution
moves less than `exit_kl` between successive iterations (KL divergence at its last position): a batch gives every
row what it would get alone.

KV cache: the core has `recurrent_cache_slots` slots; iteration i writes and reads slot i mod slots. With at least
r slots, cached decoding equals a full recompute; with fewer (default 1) the cache does not grow with r, and a token
sees the previous tokens' keys from their last iteration (the paper's KV-cache sharing).

The looped transformer of the abacus paper (McLeish et al. 2024) is the same loop with other parts: no prelude or
coda, the whole block stack is the core, the state starts at 0 and the input is injected by addition,
s_i = blocks(s_{i-1} + e), so one pass is exactly the plain stack (LoopedStack).

Entry points: SandwichBlock, RecurrentDepth, LoopedStack, run_recurrent(blocks, recurrence, x, ...).
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

    def merge(self, state: torch.Tensor, injected: torch.Tensor) -> torch.Tensor:
        return self.state(state) + self.inject(injected)

    def initial_state(self, like: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return torch.zeros_like(like)
        state = torch.empty((*like.shape[:-1], like.shape[-1] * self.width_parts), dtype=like.dtype,
                            device=like.device)
        nn.init.trunc_normal_(state, std=self.state_std, a=-3 * self.state_std, b=3 * self.state_std)
        return state.chunk(self.width_parts, -1)[self.width_index] * self.state_scale


class LoopedStack(nn.Module):
    """A looped transformer's recurrence: every block is in the core, the state starts at 0 and the embedded input
    is added before each pass. One cache slot per pass, so decoding at the trained loop count is exact."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.prelude, self.core, self.coda = 0, config.n_layers, 0
        self.slots = config.loop

    def merge(self, state: torch.Tensor, injected: torch.Tensor) -> torch.Tensor:
        return state + injected

    def initial_state(self, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(like)


class _CacheSlot:
    """The KV cache as one core iteration sees it: block layer k is the cache's layer k + offset."""

    def __init__(self, cache, offset: int) -> None:
        self.cache, self.offset = cache, offset

    def attend(self, layer: int, q, keys, values, mask, start: int):
        return self.cache.attend(layer + self.offset, q, keys, values, mask, start)


def _slot(cache, offset: int):
    return None if cache is None else (cache if offset == 0 else _CacheSlot(cache, offset))


class _RowExit:
    """Adaptive exit per sequence: a row stops once its own output distribution (at its last position) moves less
    than the threshold. An exited row keeps the output of its last iteration; the batch runs on for the others,
    and what an exited row would write into the KV cache is replaced by what it wrote at its own last iteration
    (zeros where it never wrote in this call), so every row gets exactly what it would get decoded alone."""

    def __init__(self, cache, batch: int, device: torch.device, threshold: float) -> None:
        self.cache, self.threshold = cache, threshold
        self.exited = torch.zeros(batch, dtype=torch.bool, device=device)
        self.steps = torch.zeros(batch, dtype=torch.long, device=device)
        self.written: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.out: torch.Tensor | None = None
        self.previous: torch.Tensor | None = None

    def attend(self, layer: int, q, keys, values, mask, start: int):
        if bool(self.exited.any()):
            old_keys, old_values = self.written.get(layer, (torch.zeros_like(keys), torch.zeros_like(values)))
            rows = self.exited.view(-1, 1, 1, 1)
            keys, values = torch.where(rows, old_keys, keys), torch.where(rows, old_values, values)
        self.written[layer] = (keys, values)
        return self.cache.attend(layer, q, keys, values, mask, start)

    def check(self, step: int, out: torch.Tensor, logits: torch.Tensor) -> bool:
        """After iteration `step` (0-based): mark the rows that agree with their previous iteration; True when
        every row has exited."""
        self.steps = torch.where(self.exited, self.steps, step + 1)
        if self.previous is not None:
            log_now = F.log_softmax(logits[:, -1].float(), -1)
            log_before = F.log_softmax(self.previous[:, -1].float(), -1)
            agree = (log_now.exp() * (log_now - log_before)).sum(-1) < self.threshold
            newly = agree & ~self.exited
            self.out = out if self.out is None else torch.where(newly.view(-1, 1, 1), out, self.out)
            self.exited = self.exited | newly
        self.previous = logits
        return bool(self.exited.all())

    def finish(self, out: torch.Tensor, steps: int) -> torch.Tensor:
        self.steps = torch.where(self.exited, self.steps, steps)
        return out if self.out is None else torch.where(self.exited.view(-1, 1, 1), self.out, out)


def run_recurrent(blocks: nn.ModuleList, recurrence: RecurrentDepth | LoopedStack, x: torch.Tensor, rotary, mask,
                  kv_cache, cache_start: int, steps: int, backprop_depth: int, exit_kl: float = 0.0,
                  readout: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  stats: dict | None = None, initial_state: torch.Tensor | None = None) -> torch.Tensor:
    """Prelude, `steps` core iterations (gradient through the last backprop_depth), coda; the coda's output.
    exit_kl > 0 (with readout: hidden -> logits) stops each row once its successive outputs agree; stats, if
    given, receives the iterations the batch ran ("steps") and each row's ("row_steps")."""
    prelude = blocks[:recurrence.prelude]
    core = blocks[recurrence.prelude:recurrence.prelude + recurrence.core]
    coda = blocks[recurrence.prelude + recurrence.core:]
    for block in prelude:
        x = block(x, rotary, mask, kv_cache, cache_start)
    injected = x
    state = recurrence.initial_state(x) if initial_state is None else initial_state
    exits = _RowExit(kv_cache, x.shape[0], x.device, exit_kl) if exit_kl > 0 and readout is not None else None
    cache = kv_cache if exits is None or kv_cache is None else exits
    coda_cache = _slot(cache, (recurrence.slots - 1) * recurrence.core)
    done = 0
    for step in range(steps):
        tracked = torch.is_grad_enabled() and step >= steps - backprop_depth
        with torch.set_grad_enabled(tracked):
            state = recurrence.merge(state, injected)
            core_cache = _slot(cache, (step % recurrence.slots) * recurrence.core)
            for block in core:
                state = block(state, rotary, mask, core_cache, cache_start)
        done = step + 1
        if exits is not None and step < steps - 1:
            out = _coda(coda, state, rotary, mask, coda_cache, cache_start)
            if exits.check(step, out, readout(out)):
                break
    out = exits.out if exits is not None and bool(exits.exited.all()) else \
        _coda(coda, state, rotary, mask, coda_cache, cache_start)
    if exits is not None:
        out = exits.finish(out, done)
    if stats is not None:
        stats["steps"] = done
        stats["row_steps"] = exits.steps.tolist() if exits is not None else [done] * x.shape[0]
    return out


def _coda(coda: nn.ModuleList, state: torch.Tensor, rotary, mask, cache, cache_start: int) -> torch.Tensor:
    for block in coda:
        state = block(state, rotary, mask, cache, cache_start)
    return state
