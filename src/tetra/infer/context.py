"""How a run holds a long context: the decoding attention policy, prefill in chunks, and where the KV cache lives
(its dtype and device), with a clear refusal, naming the memory it would need, when the cache cannot fit.

Entry points: ContextOptions, kv_bytes_per_token, free_bytes, check_cache_fits, prefill.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from tetra.errors import ConfigError
from tetra.infer.attention.policy import AttentionPolicy
from tetra.model import KVCache, Transformer
from tetra.model.config import ModelConfig

GIB = 1024**3
# Share of the free memory a cache may take (activations, the index's own copy of keys and the rest need room).
USABLE_SHARE = 0.9


@dataclass(frozen=True)
class ContextOptions:
    """attention: the decoding policy; prefill_chunk: prompt tokens per forward pass (0 = all at once), which bounds
    activation memory by the chunk; kv_dtype / kv_device: the cache's (None = the model's)."""

    attention: AttentionPolicy = field(default_factory=AttentionPolicy)
    prefill_chunk: int = 0
    kv_dtype: torch.dtype | None = None
    kv_device: str | None = None

    def __post_init__(self) -> None:
        if self.prefill_chunk < 0:
            raise ConfigError(f"--prefill-chunk must be >= 0 (0 = the whole prompt at once; got {self.prefill_chunk}).")


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one position of one sequence takes in a dense cache: keys and values of every layer."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.cache_layers * config.kv_heads * config.resolved_head_dim * element


def free_bytes(device: torch.device | str) -> int:
    """Memory free for a new allocation: the GPU's free memory, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_cache_fits(config: ModelConfig, batch: int, length: int, dtype: torch.dtype, device: torch.device | str,
                     policy: AttentionPolicy, available: int | None = None) -> int:
    """Bytes the cache needs where it lives; a ConfigError naming that and what is free when it does not fit."""
    device = torch.device("cpu") if policy.kind == "topk-index" else torch.device(device)
    per_token = kv_bytes_per_token(config, dtype)
    if policy.kind == "topk-index":  # the index keeps its own fp32 copy of the prefix keys
        per_token += per_token // 2 * 4 // torch.empty((), dtype=dtype).element_size()
    needed = batch * length * per_token
    available = free_bytes(device) if available is None else available
    if needed > USABLE_SHARE * available:
        raise ConfigError(
            f"A context of {length} tokens x {batch} sequence(s) needs {needed / GIB:.2f} GiB of KV cache on {device} "
            f"({per_token} bytes per token: {config.cache_layers} layers x {config.kv_heads} KV heads x "
            f"{config.resolved_head_dim} dims, keys and values), but only {available / GIB:.2f} GiB is free. Use "
            "--kv-dtype bf16 (half of fp32), --kv-device cpu, --attention topk-index (the prefix in CPU memory), "
            "fewer prompts at once, or a shorter prompt.")
    return needed


def prefill(model: Transformer, ids: torch.Tensor, mask: torch.Tensor | None, cache: KVCache,
            chunk: int = 0) -> torch.Tensor:
    """Run the prompt [B, T] into the cache (chunk tokens per pass; 0 = all at once) and tell the cache the prompt
    is in; returns the last position's logits [B, 1, vocab]."""
    length = ids.shape[1]
    step = chunk if chunk > 0 else length
    logits = None
    for start in range(0, length, step):
        end = min(length, start + step)
        logits = model(ids[:, start:end], attention_mask=None if mask is None else mask[:, :end], kv_cache=cache,
                       cache_start=start, last_only=True)
    cache.end_prefill(mask)
    return logits
