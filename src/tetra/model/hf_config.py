"""Hugging Face config.json <-> ModelConfig for the Llama, Qwen2, Mistral, GPT-2 and OPT families.

Entry points: from_hf_config(dict) -> ModelConfig and to_hf_config(ModelConfig) -> dict.
"""

from __future__ import annotations

from typing import Any

from tetra.errors import ConfigError
from tetra.model.config import SUPPORTED_ROPE_TYPES, ModelConfig, RopeScaling

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "opt": "OPTForCausalLM",
}
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
TETRA_TO_HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def _activation(hf: dict[str, Any], key: str, default: str) -> str:
    name = hf.get(key) or default
    if name not in HF_ACTIVATIONS:
        raise ConfigError(f"config.json: activation {name!r} is not supported; tetra supports "
                          f"{', '.join(sorted(HF_ACTIVATIONS))}.")
    return HF_ACTIVATIONS[name]


def _dtype(hf: dict[str, Any]) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
    """Rotary base and scaling from either the v5 `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"config.json: rope scaling {rope_type!r} is not supported; tetra supports "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}. Remove rope_scaling or convert the model elsewhere.")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    scaling = RopeScaling(rope_type=rope_type, **{name: params[name] for name in fields if name in params})
    return theta, scaling


def _llama_like(hf: dict[str, Any], family: str) -> ModelConfig:
    n_heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // n_heads
    theta, scaling = _rope(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    sliding_window = 0
    if family == "mistral":
        sliding_window = hf.get("sliding_window") or 0
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise ConfigError("config.json: Qwen2 with use_sliding_window=true is not supported (its window applies to "
                          "only some layers). Set use_sliding_window to false if the model never exceeds its window.")
    return ModelConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hidden, n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim if head_dim != hidden // n_heads else 0, intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), activation=_activation(hf, "hidden_act", "silu"), gated_mlp=True,
        positions="rope", rope_theta=theta, rope_scaling=scaling,
        qkv_bias=attention_bias or family == "qwen2", out_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), sliding_window=sliding_window,
    )


def _gpt2(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise ConfigError("config.json: GPT-2 with scale_attn_by_inverse_layer_idx=true or scale_attn_weights=false "
                          "is not supported; tetra scales attention by 1/sqrt(head_dim) as standard GPT-2 does.")
    hidden = hf.get("n_embd", 768)
    return ModelConfig(
        family="gpt2", vocab_size=hf.get("vocab_size", 50257), hidden_size=hidden, n_layers=hf.get("n_layer", 12),
        n_heads=hf.get("n_head", 12), intermediate_size=hf.get("n_inner") or 4 * hidden,
        max_position_embeddings=hf.get("n_positions", 1024), norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=_activation(hf, "activation_function", "gelu_new"),
        gated_mlp=False, positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
    )


def _opt(hf: dict[str, Any]) -> ModelConfig:
    hidden = hf["hidden_size"]
    if not hf.get("do_layer_norm_before", True) or hf.get("word_embed_proj_dim", hidden) != hidden:
        raise ConfigError("config.json: this OPT layout (post-LayerNorm with a projection between a "
                          f"{hf.get('word_embed_proj_dim')}-wide embedding and the {hidden}-wide hidden state, as in "
                          "opt-350m) is not supported; every other OPT size (125m, 1.3b, 2.7b, 6.7b, ...) is.")
    if not hf.get("layer_norm_elementwise_affine", True):
        raise ConfigError("config.json: OPT with layer_norm_elementwise_affine=false is not supported.")
    bias = bool(hf.get("enable_bias", True))
    return ModelConfig(
        family="opt", vocab_size=hf["vocab_size"], hidden_size=hidden, n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], intermediate_size=hf["ffn_dim"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm="layernorm", norm_eps=1e-5,
        activation=_activation(hf, "activation_function", "relu"), gated_mlp=False, positions="learned",
        position_offset=2, qkv_bias=bias, out_bias=bias, mlp_bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """Translate a Hugging Face config.json dict; unsupported architectures are named with the supported list."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        found = family or ", ".join(hf.get("architectures") or []) or "no model_type"
        raise ConfigError(f"config.json describes a {found!r} model, which tetra does not support. Supported "
                          f"model_type values: {', '.join(ARCHITECTURES)} ({', '.join(ARCHITECTURES.values())}).")
    try:
        config = _gpt2(hf) if family == "gpt2" else _opt(hf) if family == "opt" else _llama_like(hf, family)
    except KeyError as missing:
        raise ConfigError(f"config.json for a {family} model lacks the required key {missing}.") from None
    config.bos_token_id = hf.get("bos_token_id")
    config.eos_token_id = hf.get("eos_token_id")
    config.pad_token_id = hf.get("pad_token_id")
    config.dtype = _dtype(hf)
    return config.validate()


def _common(config: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": [ARCHITECTURES[config.family]], "model_type": config.family, "vocab_size": config.vocab_size,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": config.tie_embeddings, "dtype": config.dtype, "torch_dtype": config.dtype,
        "use_cache": True,
    }


def _llama_like_to_hf(config: ModelConfig) -> dict[str, Any]:
    scaling = config.rope_scaling
    rope_parameters: dict[str, Any] = {"rope_type": scaling.rope_type, "rope_theta": config.rope_theta}
    if scaling.rope_type != "default":
        rope_parameters["factor"] = scaling.factor
    if scaling.rope_type == "llama3":
        rope_parameters.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                               original_max_position_embeddings=scaling.original_max_position_embeddings)
    legacy_scaling = None if scaling.rope_type == "default" else {k: v for k, v in rope_parameters.items()
                                                                  if k != "rope_theta"}
    hf = {
        "hidden_size": config.hidden_size, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
        "head_dim": config.resolved_head_dim, "intermediate_size": config.mlp_width,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.norm_eps,
        "hidden_act": TETRA_TO_HF_ACTIVATION[config.activation], "rope_theta": config.rope_theta,
        "rope_scaling": legacy_scaling, "rope_parameters": rope_parameters, "attention_dropout": 0.0,
    }
    if config.family == "llama":
        if config.qkv_bias != config.out_bias:
            raise ConfigError("A Llama checkpoint has one attention_bias flag for q/k/v and output; this model has "
                              "bias on only some of them. Save it with model.family = \"qwen2\" instead.")
        hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    elif config.family == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None)
    else:
        hf["sliding_window"] = config.sliding_window or None
    return hf


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """A config.json dict that transformers' AutoConfig reads back into the same architecture."""
    check_family_layout(config)
    hf = _common(config)
    if config.family == "gpt2":
        hf.update(n_embd=config.hidden_size, n_layer=config.n_layers, n_head=config.n_heads,
                  n_inner=config.mlp_width, n_positions=config.max_position_embeddings,
                  n_ctx=config.max_position_embeddings, layer_norm_epsilon=config.norm_eps,
                  activation_function=TETRA_TO_HF_ACTIVATION[config.activation],
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif config.family == "opt":
        hf.update(hidden_size=config.hidden_size, num_hidden_layers=config.n_layers,
                  num_attention_heads=config.n_heads, ffn_dim=config.mlp_width,
                  max_position_embeddings=config.max_position_embeddings, word_embed_proj_dim=config.hidden_size,
                  do_layer_norm_before=True, enable_bias=config.qkv_bias,
                  activation_function=TETRA_TO_HF_ACTIVATION[config.activation], dropout=0.0)
    else:
        hf.update(_llama_like_to_hf(config))
    return hf


FAMILY_LAYOUTS: dict[str, dict[str, Any]] = {
    "llama": {"norm": "rmsnorm", "positions": "rope", "gated_mlp": True},
    "qwen2": {"norm": "rmsnorm", "positions": "rope", "gated_mlp": True, "qkv_bias": True, "out_bias": False,
              "mlp_bias": False, "sliding_window": 0},
    "mistral": {"norm": "rmsnorm", "positions": "rope", "gated_mlp": True, "qkv_bias": False, "out_bias": False,
                "mlp_bias": False},
    "gpt2": {"norm": "layernorm", "positions": "learned", "position_offset": 0, "gated_mlp": False,
             "qkv_bias": True, "out_bias": True, "mlp_bias": True, "tie_embeddings": True},
    "opt": {"norm": "layernorm", "positions": "learned", "position_offset": 2, "gated_mlp": False, "norm_eps": 1e-5},
}


def check_family_layout(config: ModelConfig) -> None:
    """Refuse to write a config.json whose architecture cannot express this model's layout."""
    if config.positions in ("abacus", "abacus+rope", "none") or config.iterated:
        kind = ("recurrent-depth" if config.recurrent else "looped" if config.looped else
                f"positions = {config.positions!r}")
        raise ConfigError(f"A {kind} model has no Hugging Face architecture in transformers to be written as. Keep "
                          "it as a tetra checkpoint: tetra generate, tetra eval and the Python API read it.")
    problems = [f"{name} is {getattr(config, name)!r} but {config.family} needs {value!r}"
                for name, value in FAMILY_LAYOUTS[config.family].items() if getattr(config, name) != value]
    if config.family in ("gpt2", "opt") and config.kv_heads != config.n_heads:
        problems.append(f"{config.family} has no grouped-query attention (n_kv_heads must equal n_heads)")
    if config.family in ("gpt2", "opt") and config.head_dim not in (0, config.hidden_size // config.n_heads):
        problems.append(f"{config.family} needs head_dim = hidden_size / n_heads")
    if problems:
        raise ConfigError(f"This model cannot be written as a Hugging Face {ARCHITECTURES[config.family]}: "
                          + "; ".join(problems) + ". Set model.family to the architecture that matches the layout.")
