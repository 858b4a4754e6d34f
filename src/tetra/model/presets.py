"""Named model shapes (tiny test models up to published Llama sizes), for `tetra init`, benchmarks and planning.

Entry point: preset_config(name, vocab_size=None) -> ModelConfig; PRESETS lists the names.
"""

from __future__ import annotations

from typing import Any

from tetra.errors import ConfigError
from tetra.model.config import ModelConfig, RopeScaling

LLAMA3_ROPE = RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
PRESETS: dict[str, dict[str, Any]] = {
    # ~5M parameters with a 4k vocabulary: trains in minutes on two CPU cores.
    "tiny": dict(vocab_size=4096, hidden_size=256, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=704,
                 max_position_embeddings=1024, tie_embeddings=True),
    "small": dict(vocab_size=32000, hidden_size=512, n_layers=8, n_heads=8, n_kv_heads=4, intermediate_size=1408,
                  max_position_embeddings=2048),
    # Llama 3.2 1B shape.
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                     intermediate_size=8192, max_position_embeddings=131072, rope_theta=500000.0,
                     rope_scaling=LLAMA3_ROPE, tie_embeddings=True, norm_eps=1e-5),
    # Llama 3.1 8B shape.
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                     intermediate_size=14336, max_position_embeddings=131072, rope_theta=500000.0,
                     rope_scaling=LLAMA3_ROPE, norm_eps=1e-5),
    "gpt2-small": dict(family="gpt2", vocab_size=50257, hidden_size=768, n_layers=12, n_heads=12,
                       intermediate_size=3072, max_position_embeddings=1024, norm="layernorm", activation="gelu_tanh",
                       gated_mlp=False, positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                       tie_embeddings=True),
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset's ModelConfig with fields overridden (e.g. vocab_size from a tokenizer)."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown model preset {name!r}. Presets: {', '.join(PRESETS)}.")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig(**values).validate()
