"""Hugging Face tensor names <-> tetra tensor names, per family, including GPT-2's transposed and fused layouts.

Entry points: normalize_hf_names, hf_to_tetra_state, tetra_to_hf_state (hf_tensor_plan: the same, one tensor at a
time), and hf_module_name / tetra_module_name for module-level names (adapters).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from tetra.errors import CheckpointError

COPY, TRANSPOSE, FUSED_QKV = "copy", "transpose", "fused_qkv"


@dataclass(frozen=True)
class Rule:
    """One module in both namings; {i} stands for the layer index."""

    hf: str
    tetra: str
    kind: str = COPY


LLAMA_RULES = [
    Rule("model.embed_tokens", "embed"), Rule("model.norm", "norm"), Rule("lm_head", "head"),
    Rule("model.layers.{i}.input_layernorm", "blocks.{i}.attn_norm"),
    Rule("model.layers.{i}.post_attention_layernorm", "blocks.{i}.mlp_norm"),
    *[Rule(f"model.layers.{{i}}.self_attn.{name}_proj", f"blocks.{{i}}.attn.{name}") for name in "qkvo"],
    *[Rule(f"model.layers.{{i}}.mlp.{name}_proj", f"blocks.{{i}}.mlp.{name}") for name in ("gate", "up", "down")],
]
GPT2_RULES = [
    Rule("transformer.wte", "embed"), Rule("transformer.wpe", "pos_embed"), Rule("transformer.ln_f", "norm"),
    Rule("lm_head", "head"),
    Rule("transformer.h.{i}.ln_1", "blocks.{i}.attn_norm"), Rule("transformer.h.{i}.ln_2", "blocks.{i}.mlp_norm"),
    Rule("transformer.h.{i}.attn.c_attn", "blocks.{i}.attn.{qkv}", FUSED_QKV),
    Rule("transformer.h.{i}.attn.c_proj", "blocks.{i}.attn.o", TRANSPOSE),
    Rule("transformer.h.{i}.mlp.c_fc", "blocks.{i}.mlp.up", TRANSPOSE),
    Rule("transformer.h.{i}.mlp.c_proj", "blocks.{i}.mlp.down", TRANSPOSE),
]
OPT_RULES = [
    Rule("model.decoder.embed_tokens", "embed"), Rule("model.decoder.embed_positions", "pos_embed"),
    Rule("model.decoder.final_layer_norm", "norm"), Rule("lm_head", "head"),
    *[Rule(f"model.decoder.layers.{{i}}.self_attn.{name}_proj", f"blocks.{{i}}.attn.{name}") for name in "qkv"],
    Rule("model.decoder.layers.{i}.self_attn.out_proj", "blocks.{i}.attn.o"),
    Rule("model.decoder.layers.{i}.self_attn_layer_norm", "blocks.{i}.attn_norm"),
    Rule("model.decoder.layers.{i}.final_layer_norm", "blocks.{i}.mlp_norm"),
    Rule("model.decoder.layers.{i}.fc1", "blocks.{i}.mlp.up"),
    Rule("model.decoder.layers.{i}.fc2", "blocks.{i}.mlp.down"),
]
RULES = {"llama": LLAMA_RULES, "qwen2": LLAMA_RULES, "mistral": LLAMA_RULES, "gpt2": GPT2_RULES, "opt": OPT_RULES}
# Where a bare base model (GPT2Model, OPTModel) keeps its tensors relative to the causal-LM class.
BASE_MODEL_PREFIX = {"gpt2": "transformer.", "opt": "model.decoder.", "llama": "model.", "qwen2": "model.",
                     "mistral": "model."}
# Buffers some checkpoints carry that hold no learned state.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(?P<param>weight|bias)$")


def normalize_hf_names(family: str, tensors: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Causal-LM names for checkpoints of the bare base model; stateless buffers and a tied head's copy dropped."""
    prefix = BASE_MODEL_PREFIX[family]
    if not any(name.startswith(prefix) for name in tensors):
        tensors = {(name if name.startswith("lm_head.") else prefix + name): value for name, value in tensors.items()}
    return {name: value for name, value in tensors.items()
            if not name.endswith(IGNORED_SUFFIXES) and not (tied and name == "lm_head.weight")}


def hf_to_tetra_state(family: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (for GPT-2 also transpose and split) normalized Hugging Face tensors into tetra state-dict names."""
    patterns = [(rule, _pattern(rule.hf)) for rule in RULES[family]]
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for name, value in tensors.items():
        for rule, pattern in patterns:
            match = pattern.match(name)
            if match:
                target = rule.tetra.replace("{i}", match.groupdict().get("i") or "") + "." + match["param"]
                _convert_in(rule.kind, target, match["param"], value, state)
                break
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"The checkpoint has tensors a {family} model does not have: {_few(unknown)}. "
                              "It was probably saved from a different architecture than config.json names.")
    return state


def _convert_in(kind: str, target: str, param: str, value: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    if kind == COPY:
        state[target] = value
    elif kind == TRANSPOSE:
        state[target] = value.t().contiguous() if param == "weight" else value
    else:  # GPT-2 stores q, k and v as one [in, 3 * out] Conv1D matrix
        pieces = (value.t() if param == "weight" else value).chunk(3, dim=0)
        for piece, head in zip(pieces, ("q", "k", "v"), strict=True):
            state[target.replace("{qkv}", head)] = piece.contiguous()


@dataclass(frozen=True)
class HfTensor:
    """One Hugging Face tensor and the tetra tensors it is made of (GPT-2's fused q/k/v takes three)."""

    name: str
    sources: tuple[str, ...]
    kind: str
    param: str  # weight | bias

    def shape(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
        parts = [tuple(shapes[source]) for source in self.sources]
        shape = (sum(part[0] for part in parts), *parts[0][1:]) if self.kind == FUSED_QKV else parts[0]
        return tuple(reversed(shape)) if self.kind != COPY and self.param == "weight" else shape

    def build(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The tensor, reading only its own sources."""
        value = torch.cat([read(source) for source in self.sources]) if self.kind == FUSED_QKV else \
            read(self.sources[0])
        return value.t().contiguous() if self.kind != COPY and self.param == "weight" else value


def hf_tensor_plan(family: str, names: Iterable[str], tied: bool) -> list[HfTensor]:
    """The Hugging Face tensors of a tetra state with these names, in the order tetra_to_hf_state gives them; a tied
    head is left out, as transformers itself saves it."""
    names = list(names)
    plan = []
    for rule in RULES[family]:
        source = _pattern(rule.tetra.replace("{qkv}", "q"))
        for name in names:
            match = source.match(name)
            if not match or (tied and rule.tetra == "head"):
                continue
            target = rule.hf.replace("{i}", match.groupdict().get("i") or "") + "." + match["param"]
            sources = tuple(name.replace(".attn.q.", f".attn.{head}.") for head in "qkv") \
                if rule.kind == FUSED_QKV else (name,)
            plan.append(HfTensor(target, sources, rule.kind, match["param"]))
    return plan


def tetra_to_hf_state(family: str, state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_tetra_state; a tied head is left out, as transformers itself saves it."""
    return {tensor.name: tensor.build(state.__getitem__) for tensor in hf_tensor_plan(family, state, tied)}


def _few(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _module_pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


def _renamed_module(family: str, name: str, source: str, target: str) -> str | None:
    for rule in RULES[family]:
        if rule.kind != COPY:
            continue
        match = _module_pattern(getattr(rule, source)).fullmatch(name)
        if match:
            return getattr(rule, target).replace("{i}", match.groupdict().get("i") or "")
    return None


def hf_module_name(family: str, tetra_module: str) -> str | None:
    """The Hugging Face name of a tetra module whose weight is stored as is (None for GPT-2's fused or transposed
    Conv1D modules, which have no one-to-one counterpart)."""
    return _renamed_module(family, tetra_module, "tetra", "hf")


def tetra_module_name(family: str, hf_module: str) -> str | None:
    """The inverse of hf_module_name."""
    return _renamed_module(family, hf_module, "hf", "tetra")
