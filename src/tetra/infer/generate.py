"""Token-level generation: one batched prefill (in chunks, if asked) into a preallocated KV cache, then one token
per step, with the decoding attention policy the context options name.

Entry point: generate_ids(model, prompts, max_new_tokens, ...) -> new token ids per prompt.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tetra.errors import ConfigError
from tetra.infer.attention.factory import make_cache
from tetra.infer.context import ContextOptions, check_cache_fits, prefill
from tetra.infer.sampling import SamplingConfig, sample_next
from tetra.model import Transformer

# Called after each step with {row: new token} for the rows still running; returns rows that should stop there
# (a stop string, say).
StepCallback = Callable[[dict[int, int]], set[int] | None]


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts right-aligned in one tensor, and a mask of real tokens (None when nothing needed padding)."""
    longest = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), longest), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, longest - len(prompt):] = True
    return ids, (None if bool(mask.all()) else mask)


def _check_lengths(model: Transformer, prompts: list[list[int]], max_new_tokens: int) -> None:
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ConfigError("Every prompt needs at least one token; got an empty prompt.")
    total = max(len(prompt) for prompt in prompts) + max_new_tokens
    limit = model.config.max_position_embeddings
    if model.config.positions == "learned" and total > limit:
        raise ConfigError(f"Prompt plus --max-new-tokens is {total} tokens, but this model has learned positions for "
                          f"only {limit}. Shorten the prompt or lower --max-new-tokens.")


@torch.inference_mode()
def generate_ids(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    eos_ids: list[int] | None = None,
    seed: int | None = None,
    on_step: StepCallback | None = None,
    context: ContextOptions | None = None,
) -> list[list[int]]:
    """Generate up to max_new_tokens per prompt; a row stops at an EOS id (kept in its output) or when on_step says."""
    sampling = sampling or SamplingConfig(temperature=0.0)
    context = context or ContextOptions()
    _check_lengths(model, prompts, max_new_tokens)
    device = model.embed.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids, prompt_mask = left_pad(prompts, pad_id, device)
    batch, prompt_length = ids.shape
    kv_dtype = context.kv_dtype or model.embed.weight.dtype
    kv_device = context.kv_device or device
    check_cache_fits(model.config, batch, prompt_length + max_new_tokens, kv_dtype, kv_device, context.attention)
    cache = make_cache(model, context.attention, batch, prompt_length + max_new_tokens, kv_dtype, kv_device)
    mask = None
    if prompt_mask is not None:
        mask = torch.ones((batch, prompt_length + max_new_tokens), dtype=torch.bool, device=device)
        mask[:, :prompt_length] = prompt_mask
    eos = torch.tensor(eos_ids or [], dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    logits = prefill(model, ids, None if mask is None else mask[:, :prompt_length], cache, context.prefill_chunk)
    for step in range(max_new_tokens):
        next_ids = sample_next(logits[:, -1], sampling, generator)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
        tokens = next_ids.tolist()
        running = (~finished).tolist()
        appended = {row: token for row, token in enumerate(tokens) if running[row]}
        for row, token in appended.items():
            outputs[row].append(token)
        finished |= torch.isin(next_ids, eos)
        stopped = on_step(appended) if on_step else None
        if stopped:
            finished[list(stopped)] = True
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        position = prompt_length + step
        logits = model(next_ids[:, None], attention_mask=None if mask is None else mask[:, : position + 1],
                       kv_cache=cache, cache_start=position, last_only=True)
    return outputs
