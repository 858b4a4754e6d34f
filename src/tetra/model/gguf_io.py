"""Reading GGUF files (llama.cpp's format): metadata, a ModelConfig, and dequantized tensors under tetra's names.

llama.cpp's converter reorders the rows of the query and key projections of Llama-architecture models (it pairs
rotary halves by interleaving); reading undoes that so the weights match the Hugging Face layout tetra uses.

Entry points: read_gguf(path, dtype) -> GGUFModel, read_gguf_config(path) and read_gguf_metadata(path)
(tetra.files.is_gguf_file tells a GGUF file by its magic bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tetra.errors import CheckpointError
from tetra.model.config import ModelConfig, RopeScaling

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# GGUF module names -> tetra module names; {i} is the layer index.
GGUF_NAMES = {
    "token_embd": "embed", "output_norm": "norm", "output": "head",
    "blk.{i}.attn_norm": "blocks.{i}.attn_norm", "blk.{i}.ffn_norm": "blocks.{i}.mlp_norm",
    "blk.{i}.attn_q": "blocks.{i}.attn.q", "blk.{i}.attn_k": "blocks.{i}.attn.k",
    "blk.{i}.attn_v": "blocks.{i}.attn.v", "blk.{i}.attn_output": "blocks.{i}.attn.o",
    "blk.{i}.ffn_gate": "blocks.{i}.mlp.gate", "blk.{i}.ffn_up": "blocks.{i}.mlp.up",
    "blk.{i}.ffn_down": "blocks.{i}.mlp.down",
}
# Tensors that hold no learned weights tetra needs (rope_freqs is turned into the config's rope scaling).
IGNORED = ("rope_freqs.weight",)


@dataclass
class GGUFModel:
    """What a GGUF file holds, read into tetra's terms."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # tetra state-dict names, Hugging Face row order
    metadata: dict[str, Any]  # every key-value field (tokenizer arrays included)


def _reader(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise CheckpointError(f"{path} does not exist. Pass the path of a .gguf model file.")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as error:
        raise CheckpointError(f"{path} is not a readable GGUF file ({error}). It may be truncated, or not a GGUF "
                              "model at all: download or convert it again.") from None


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every key-value field of a GGUF file as plain Python values."""
    return _metadata(_reader(Path(path)))


def _metadata(reader: Any) -> dict[str, Any]:
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _config(metadata: dict[str, Any], tensor_names: set[str], vocab_size: int, path: Path) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path} holds a {arch!r} model; tetra reads GGUF files of the architectures "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama, Mistral, SmolLM, Qwen2 and their "
                              "fine-tunes). Convert the original Hugging Face folder with `tetra convert from-hf`.")

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{key}", default)

    missing = [f"{arch}.{key}" for key in ("block_count", "embedding_length", "feed_forward_length",
                                           "attention.head_count") if get(key) is None]
    if missing:
        raise CheckpointError(f"{path} lacks the metadata {', '.join(missing)}; it is not a complete GGUF model.")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    tokenizer_id = lambda key: metadata.get(f"tokenizer.ggml.{key}")  # noqa: E731
    return ModelConfig(
        family="llama" if arch == "llama" else arch, vocab_size=vocab_size, hidden_size=hidden,
        n_layers=int(get("block_count")), n_heads=heads, n_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim if head_dim != hidden // heads else 0, intermediate_size=int(get("feed_forward_length")),
        max_position_embeddings=int(get("context_length", 2048)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=float(get("rope.freq_base", 1e4)),
        rope_scaling=_rope_scaling(metadata, arch, path),
        qkv_bias="blk.0.attn_q.bias" in tensor_names, out_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names, tie_embeddings="output.weight" not in tensor_names,
        sliding_window=int(get("attention.sliding_window", 0) or 0) if arch == "llama" else 0,
        bos_token_id=tokenizer_id("bos_token_id"), eos_token_id=tokenizer_id("eos_token_id"),
        pad_token_id=tokenizer_id("padding_token_id"),
    ).validate()


def _rope_scaling(metadata: dict[str, Any], arch: str, path: Path) -> RopeScaling:
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    if kind in ("none", None):
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(metadata[f"{arch}.rope.scaling.factor"]))
    raise CheckpointError(f"{path} uses {kind!r} rope scaling; tetra reads GGUF files with none or linear rope "
                          "scaling (Llama 3.1-style scaling is read from the rope_freqs tensor).")


def _llama3_scaling_from_factors(factors: np.ndarray, config: ModelConfig, path: Path) -> RopeScaling:
    """llama.cpp stores Llama 3.1 rope scaling as one divisor per frequency; recover the parameters that give
    exactly those divisors (the published ones: low 1, high 4, an original context of 8192 or 4096...)."""
    from tetra.model.layers import rope_inverse_frequencies

    plain = rope_inverse_frequencies(config.resolved_head_dim, config.rope_theta, RopeScaling())
    factor = float(factors.max())
    for original in (8192, 4096, 2048, 16384, 32768):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
            scaling = RopeScaling("llama3", factor, low, high, original)
            scaled = rope_inverse_frequencies(config.resolved_head_dim, config.rope_theta, scaling)
            if np.allclose((plain / scaled).numpy(), factors, rtol=1e-4, atol=1e-5):
                return scaling
    raise CheckpointError(f"{path} has per-frequency rope factors (rope_freqs) that match no Llama-3 scaling "
                          "tetra knows; convert the original Hugging Face folder instead.")


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of query/key rows: it interleaved the two rotary halves of every head."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _tetra_name(name: str, path: Path) -> str:
    module, _, param = name.rpartition(".")
    parts = module.split(".")
    key = module
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        key = f"blk.{{i}}.{parts[2]}"
    if key not in GGUF_NAMES or param not in ("weight", "bias"):
        raise CheckpointError(f"{path} has a tensor tetra does not know: {name}. The model has parts beyond the "
                              "Llama/Qwen2 layout tetra reads from GGUF.")
    return GGUF_NAMES[key].replace("{i}", parts[1] if "{i}" in key else "") + "." + param


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    try:
        values = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        supported = [kind.name for kind in GGMLQuantizationType if _can_dequantize(kind)]
        raise CheckpointError(f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf "
                              f"package cannot dequantize. Supported types: {', '.join(supported)}. Use a file "
                              "quantized with one of those.") from None
    return values.reshape(tuple(int(size) for size in reversed(tensor.shape)))


def _can_dequantize(kind: Any) -> bool:
    from gguf import GGMLQuantizationType, quants

    return kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or kind in quants._type_traits


def _open(path: Path) -> tuple[dict[str, Any], dict[str, Any], ModelConfig]:
    """Metadata, tensors by GGUF name (not yet read) and the model configuration."""
    reader = _reader(path)
    metadata = _metadata(reader)
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise CheckpointError(f"{path} has no token_embd.weight tensor; it is not a language model GGUF file.")
    config = _config(metadata, set(by_name), int(by_name["token_embd.weight"].shape[1]), path)
    if "rope_freqs.weight" in by_name:
        config.rope_scaling = _llama3_scaling_from_factors(_dequantize(by_name["rope_freqs.weight"], path),
                                                           config, path)
    return metadata, by_name, config


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a GGUF file, without reading its tensors."""
    return _open(Path(path))[2]


class GGUFTensors:
    """A GGUF file's tensors by tetra name, dequantized one at a time (fp32, Hugging Face row order): what loading a
    model split over ranks reads, one tensor in memory at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.metadata, by_name, self.config = _open(self.path)
        self._by_tetra_name = {_tetra_name(name, self.path): tensor for name, tensor in by_name.items()
                               if name not in IGNORED}
        self.shapes = {name: tuple(int(size) for size in reversed(tensor.shape))
                       for name, tensor in self._by_tetra_name.items()}

    def read(self, name: str) -> torch.Tensor:
        # np.array copies: the file is memory-mapped read-only.
        value = torch.from_numpy(np.array(_dequantize(self._by_tetra_name[name], self.path), dtype=np.float32))
        if self.config.family == "llama" and (".attn.q." in name or ".attn.k." in name):
            value = _unpermute(value, self.config.n_heads if ".attn.q." in name else self.config.kv_heads)
        return value


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> GGUFModel:
    """Config, tensors (dequantized to fp32, then cast to dtype) and metadata of a GGUF model file."""
    source = GGUFTensors(path)
    tensors = {name: source.read(name).to(dtype) for name in source.shapes}
    config = source.config
    config.dtype = str(dtype).removeprefix("torch.")
    return GGUFModel(config, tensors, source.metadata)
