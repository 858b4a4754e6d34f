"""ModelConfig: one dataclass that describes every decoder family tetra runs.

Entry point: ModelConfig (plus ModelConfig.validate, to_dict and from_dict for storage).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tetra.errors import ConfigError

SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "opt")
SUPPORTED_POSITIONS = ("rope", "learned", "abacus", "abacus+rope", "none")


@dataclass
class RopeScaling:
    """Rotary frequency scaling for context extension (Llama 3.1 'llama3' or plain 'linear')."""

    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0  # how much longer the context is than in pretraining
    low_freq_factor: float = 1.0  # llama3: wavelengths above original/low_freq_factor are scaled fully
    high_freq_factor: float = 4.0  # llama3: wavelengths below original/high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # llama3: the pretraining context length


@dataclass
class ModelConfig:
    """Shape and flavour of a decoder-only transformer; the defaults are a tiny Llama."""

    family: str = "llama"  # which Hugging Face architecture this maps to: llama | qwen2 | mistral | gpt2 | opt
    vocab_size: int = 0  # rows of the token embedding; 0 = the tokenizer's vocabulary (set when training)
    hidden_size: int = 256  # model width
    n_layers: int = 4  # number of transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0 means n_heads
    head_dim: int = 0  # width of one head; 0 means hidden_size // n_heads
    intermediate_size: int = 0  # MLP width; 0 means 4 * hidden_size (non-gated) or ~8/3 * hidden_size (gated)
    max_position_embeddings: int = 2048  # longest sequence the positions support
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5  # epsilon inside the norms
    activation: str = "silu"  # silu | gelu | gelu_tanh | relu
    gated_mlp: bool = True  # SwiGLU-style gate * up (Llama) instead of up -> act -> down (GPT-2, OPT)
    positions: str = "rope"  # rope | learned | abacus | abacus+rope | none (no positions at all)
    position_offset: int = 0  # learned positions start at this row (OPT uses 2)
    rope_theta: float = 10000.0  # rotary base
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    qkv_bias: bool = False  # bias on the query/key/value projections (Qwen2, GPT-2, OPT)
    out_bias: bool = False  # bias on the attention output projection (GPT-2, OPT)
    mlp_bias: bool = False  # bias on the MLP projections (GPT-2, OPT)
    tie_embeddings: bool = False  # the output head shares the token embedding matrix
    sliding_window: int = 0  # attend only to the last N positions (Mistral); 0 means full attention
    dropout: float = 0.0  # dropout on attention probabilities and residual branches (training only)
    bos_token_id: int | None = None  # beginning-of-sequence token, if the tokenizer has one
    eos_token_id: int | list[int] | None = None  # end-of-sequence token(s): generation stops there
    pad_token_id: int | None = None  # padding token, if any
    dtype: str = "float32"  # parameter dtype the weights were stored in: float32 | bfloat16 | float16
    abacus_digit_ids: list[int] = field(default_factory=list)  # abacus: the token ids of 0..9, single-digit tokens
    abacus_max_digits: int = 0  # abacus: the longest number the table covers without the training offset
    abacus_max_offset: int = 99  # abacus: training adds k ~ U{0..this} to every digit place
    recurrent_prelude: int = 0  # recurrent depth: blocks before the iterated core (0 with core 0 = off)
    recurrent_core: int = 0  # recurrent depth: blocks iterated r times (n_layers = prelude + core + coda)
    recurrent_coda: int = 0  # recurrent depth: blocks after the core
    mean_recurrence: int = 32  # recurrent depth: the mean r training samples, and the r evaluation uses by default
    backprop_depth: int = 8  # recurrent depth: iterations the gradient flows through (the last ones)
    recurrent_cache_slots: int = 1  # recurrent depth: KV cache slots per core block (iteration i uses i mod slots)
    loop: int = 0  # looped transformer: the whole block stack applied this many times, input injected (0 = off)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)

    @property
    def recurrent(self) -> bool:
        return self.recurrent_core > 0

    @property
    def looped(self) -> bool:
        return self.loop > 0

    @property
    def iterated(self) -> bool:
        """Recurrent depth or a looped stack: the number of iterations can change at test time."""
        return self.recurrent or self.looped

    @property
    def cache_layers(self) -> int:
        """Attention layers a KV cache holds: one per block, per core block one per cache slot, and for a looped
        stack one per block and pass (so cached decoding at the trained loop count is exact)."""
        if self.recurrent:
            return self.n_layers + (self.recurrent_cache_slots - 1) * self.recurrent_core
        return self.n_layers * max(self.loop, 1)

    @property
    def uses_rotary(self) -> bool:
        return self.positions in ("rope", "abacus+rope")

    @property
    def kv_heads(self) -> int:
        """Key/value heads with the 0 default resolved."""
        return self.n_kv_heads or self.n_heads

    @property
    def resolved_head_dim(self) -> int:
        """Head width with the 0 default resolved."""
        return self.head_dim or self.hidden_size // self.n_heads

    @property
    def mlp_width(self) -> int:
        """MLP hidden width with the 0 default resolved (gated MLPs round 8/3 * hidden up to a multiple of 64)."""
        if self.intermediate_size:
            return self.intermediate_size
        if self.gated_mlp:
            return 64 * ((8 * self.hidden_size // 3 + 63) // 64)
        return 4 * self.hidden_size

    def validate(self) -> ModelConfig:
        """Check every field at once; raise one ConfigError that lists all problems."""
        problems = []
        positive = ("vocab_size", "hidden_size", "n_layers", "n_heads", "max_position_embeddings")
        problems += [f"model.{name} must be positive (got {getattr(self, name)})" for name in positive
                     if getattr(self, name) <= 0]
        choices = {"family": SUPPORTED_FAMILIES, "norm": ("rmsnorm", "layernorm"),
                   "activation": SUPPORTED_ACTIVATIONS, "positions": SUPPORTED_POSITIONS,
                   "dtype": ("float32", "bfloat16", "float16")}
        problems += [f"model.{name} is {getattr(self, name)!r}; choose one of {', '.join(options)}"
                     for name, options in choices.items() if getattr(self, name) not in options]
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            problems.append(f"rope scaling type {self.rope_scaling.rope_type!r} is not supported; "
                            f"tetra supports {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.n_heads > 0 and self.kv_heads > 0 and self.n_heads % self.kv_heads:
            problems.append(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.kv_heads})")
        if self.n_heads > 0 and not self.head_dim and self.hidden_size % self.n_heads:
            problems.append(f"model.hidden_size ({self.hidden_size}) must divide by model.n_heads ({self.n_heads}), "
                            "or set model.head_dim explicitly")
        if self.positions.startswith("abacus"):
            if len(self.abacus_digit_ids) != 10 or len(set(self.abacus_digit_ids)) != 10:
                problems.append("abacus positions need model.abacus_digit_ids: the ten token ids of 0..9, each digit "
                                "a token of its own (`tetra data arithmetic` writes a tokenizer like that)")
            if self.abacus_max_digits <= 0 or self.abacus_max_offset < 0:
                problems.append("abacus positions need model.abacus_max_digits > 0 (the longest number) and "
                                "model.abacus_max_offset >= 0 (got "
                                f"{self.abacus_max_digits}, {self.abacus_max_offset})")
        if self.recurrent:
            blocks = self.recurrent_prelude + self.recurrent_core + self.recurrent_coda
            if blocks != self.n_layers or min(self.recurrent_prelude, self.recurrent_coda) < 0:
                problems.append(f"recurrent depth needs model.n_layers = recurrent_prelude + recurrent_core + "
                                f"recurrent_coda (got {self.n_layers} vs {blocks})")
            if self.mean_recurrence < 1 or self.recurrent_cache_slots < 1:
                problems.append("model.mean_recurrence and model.recurrent_cache_slots must be at least 1 (got "
                                f"{self.mean_recurrence}, {self.recurrent_cache_slots})")
            if not 1 <= self.backprop_depth <= max(self.mean_recurrence, 1):
                problems.append(f"model.backprop_depth = {self.backprop_depth} must be in 1 .. mean_recurrence "
                                f"({self.mean_recurrence}): training backpropagates through the last "
                                "backprop_depth iterations of r ~ mean_recurrence. Lower it, or raise "
                                "mean_recurrence.")
        if self.loop < 0 or self.looped and self.recurrent:
            problems.append(f"model.loop = {self.loop} must be at least 0, and a looped stack cannot also be a "
                            "recurrent-depth model (recurrent_core > 0): choose one of the two")
        if self.uses_rotary and self.n_heads > 0 and self.resolved_head_dim % 2:
            problems.append(f"rotary positions need an even head width (got {self.resolved_head_dim})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"model.dropout must be in [0, 1) (got {self.dropout})")
        if problems:
            raise ConfigError("Invalid model configuration:\n  - " + "\n  - ".join(problems))
        return self

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids as a list (configs store one id or several)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (round-trips through from_dict)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a dict, refusing unknown keys with a hint."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"Unknown model config keys: {', '.join(unknown)}. "
                              f"Known keys: {', '.join(sorted(known))}.")
        return cls(**values).validate()

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count computed from the shape (no model needed)."""
        hidden, head_dim = self.hidden_size, self.resolved_head_dim
        attention = hidden * head_dim * (2 * self.n_heads + 2 * self.kv_heads)
        attention += (self.n_heads + 2 * self.kv_heads) * head_dim * self.qkv_bias + hidden * self.out_bias
        mlp_matrices = 3 if self.gated_mlp else 2
        mlp = mlp_matrices * hidden * self.mlp_width + self.mlp_bias * (self.mlp_width * (mlp_matrices - 1) + hidden)
        norm_size = hidden * (2 if self.norm == "layernorm" else 1)
        total = self.n_layers * (attention + mlp + 2 * norm_size) + norm_size
        if self.recurrent:  # sandwich blocks' two extra norms, and the adapter's two matrices
            total += self.n_layers * 2 * norm_size + 2 * hidden * hidden
        if include_embeddings:
            total += self.vocab_size * hidden * (1 if self.tie_embeddings else 2)
            if self.positions == "learned":
                total += (self.max_position_embeddings + self.position_offset) * hidden
            if self.positions.startswith("abacus"):
                total += (self.abacus_max_offset + self.abacus_max_digits + 1) * hidden
        return total
