"""The decoder: token (and learned position) embeddings -> blocks -> final norm -> output head.

Entry point: Transformer(config)(input_ids, ...) -> logits. No training and no parallel code lives here.
"""

from __future__ import annotations

import torch
from torch import nn

from tetra.model.abacus import AbacusEmbedding, digit_positions
from tetra.model.config import ModelConfig
from tetra.model.initialization import draw_region, full_region, init_rules
from tetra.model.kv_cache import KVCache
from tetra.model.layers import Block, RotaryEmbedding, make_norm
from tetra.model.recurrent import LoopedStack, RecurrentDepth, SandwichBlock, run_recurrent


def attention_mask_for(
    length: int, cache_start: int, key_padding: torch.Tensor | None, sliding_window: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean [B|1, 1, T, S] mask (True = may attend), or None when SDPA's own causal path is exact."""
    total = cache_start + length
    windowed = 0 < sliding_window < total
    if key_padding is None and not windowed and (cache_start == 0 or length == 1):
        return None
    query_index = torch.arange(cache_start, total, device=device)[:, None]
    key_index = torch.arange(total, device=device)[None, :]
    allowed = key_index <= query_index
    if windowed:
        allowed = allowed & (key_index > query_index - sliding_window)
    allowed = allowed[None, None]
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :total].bool()
        # A left-pad query sees no real key; letting it see itself keeps SDPA away from all-masked (NaN) rows.
        allowed = allowed | (key_index == query_index)[None, None]
    return allowed


def positions_for(
    batch: int, length: int, cache_start: int, key_padding: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Position of each new token: its index among the real (unpadded) tokens of its row."""
    if key_padding is None:
        return torch.arange(cache_start, cache_start + length, device=device)[None].expand(batch, -1)
    counted = key_padding[:, : cache_start + length].long().cumsum(-1) - 1
    return counted[:, cache_start:].clamp(min=0)


def packed_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """For [B, T] ids of the packed document each token belongs to, its position within that document."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    previous = torch.nn.functional.pad(document_ids, (1, 0), value=-2)[:, :-1]
    starts = torch.where(document_ids != previous, index, torch.zeros_like(index))
    return index - starts.cummax(dim=-1).values


def packed_attention_mask(document_ids: torch.Tensor, sliding_window: int) -> torch.Tensor:
    """Boolean [B, 1, T, T]: causal attention that never crosses from one packed document into another."""
    length = document_ids.shape[1]
    index = torch.arange(length, device=document_ids.device)
    allowed = (index[None, :] <= index[:, None])[None] & (document_ids[:, :, None] == document_ids[:, None, :])
    if sliding_window:
        allowed = allowed & (index[None, :] > index[:, None] - sliding_window)[None]
    return allowed[:, None]


class Transformer(nn.Module):
    """A decoder-only language model covering the Llama, Qwen2, Mistral, GPT-2 and OPT layouts."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_embed = None
        self.rotary = RotaryEmbedding(config) if config.uses_rotary else None
        self.abacus = AbacusEmbedding(config) if config.positions.startswith("abacus") else None
        if config.positions == "learned":
            self.pos_embed = nn.Embedding(config.max_position_embeddings + config.position_offset, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.dropout)
        block = SandwichBlock if config.recurrent else Block
        self.blocks = nn.ModuleList(block(config, index) for index in range(config.n_layers))
        self.recurrence = RecurrentDepth(config) if config.recurrent else LoopedStack(config) if config.looped else None
        self.norm = make_norm(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """GPT-2 style initialization (initialization.init_rules), drawn tile by tile from generators seeded by
        (seed, parameter name, tile), so a model split over ranks can draw each rank's piece alone and get these
        very values. seed=None draws it from torch's global generator (torch.manual_seed then decides)."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        rules = init_rules(self, std)
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                values = draw_region(rules[name], name, parameter.shape, full_region(parameter.shape), seed)
                parameter.copy_(values)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_start: int = 0,
        document_ids: torch.Tensor | None = None,
        recurrence: int | None = None,
        exit_kl: float = 0.0,
        stats: dict | None = None,
        backprop_depth: int | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden].

        attention_mask marks real tokens (1) vs padding (0) over cache + new tokens, shape [B, cache_start + T]; a
        4-D boolean [B, 1, T, S] mask is used as it is (a decoder whose rows sit at different positions builds its
        own, and then passes position_ids too).
        document_ids [B, T] (training on packed documents): positions restart at each document and attention stays
        inside it, so each document is computed exactly as if it were alone.
        """
        batch, length = input_ids.shape
        device = input_ids.device
        if document_ids is not None:
            position_ids = packed_positions(document_ids) if position_ids is None else position_ids
        elif position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 4:
                raise ValueError("a 4-D attention_mask needs explicit position_ids")
            position_ids = positions_for(batch, length, cache_start, attention_mask, device)
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids + self.config.position_offset)
        rotary = self.rotary(position_ids, x.dtype) if self.rotary is not None else None
        if self.abacus is not None:
            x = x + self._abacus_embedding(input_ids, kv_cache, cache_start, document_ids)
        x = self.embed_dropout(x)
        if document_ids is not None:
            mask = packed_attention_mask(document_ids, self.config.sliding_window)
        elif attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask
        else:
            mask = attention_mask_for(length, cache_start, attention_mask, self.config.sliding_window, device)
        if self.recurrence is not None:  # recurrent depth or a looped stack: r iterations (model/recurrent.py)
            readout = (lambda hidden: self.head(self.norm(hidden))) if exit_kl > 0 else None
            steps = recurrence or (self.config.mean_recurrence if self.config.recurrent else self.config.loop)
            depth = backprop_depth or (self.config.backprop_depth if self.config.recurrent else steps)
            x = run_recurrent(self.blocks, self.recurrence, x, rotary, mask, kv_cache, cache_start, steps, depth,
                              exit_kl, readout, stats)
        else:
            for block in self.blocks:
                x = block(x, rotary, mask, kv_cache, cache_start)
        return self.norm(x)

    def _abacus_embedding(self, input_ids: torch.Tensor, kv_cache: KVCache | None, cache_start: int,
                          document_ids: torch.Tensor | None) -> torch.Tensor:
        """Digit places of the new tokens, continuing the runs the cache ended on."""
        previous = getattr(kv_cache, "digit_run", None) if kv_cache is not None and cache_start > 0 else None
        positions = digit_positions(input_ids, self.abacus.digit_ids(input_ids.device), previous, document_ids)
        if kv_cache is not None:
            kv_cache.digit_run = positions[:, -1]
        return self.abacus(positions)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_start: int = 0,
        last_only: bool = False,
        document_ids: torch.Tensor | None = None,
        hidden_only: bool = False,
        recurrence: int | None = None,
        exit_kl: float = 0.0,
        stats: dict | None = None,
        backprop_depth: int | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with last_only, which is all sampling needs); hidden_only returns
        the final-norm hidden states instead, for a loss that applies the head itself (chunk by chunk).
        A recurrent-depth model iterates its core `recurrence` times (default: the mean it was trained for), a looped
        model its stack (default: model.loop), or stops once successive iterations' output distributions differ by
        less than exit_kl (stats["steps"] receives the iterations run). backprop_depth overrides how many of the
        last iterations the gradient flows through (a looped model's progressive loss)."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, kv_cache, cache_start, document_ids,
                                    recurrence, exit_kl, stats, backprop_depth)
        if last_only:
            hidden = hidden[:, -1:]
        return hidden if hidden_only else self.head(hidden)
