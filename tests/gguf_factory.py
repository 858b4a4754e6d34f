"""Tiny GGUF model files written the way llama.cpp's converter writes them (q/k rows permuted for Llama, tensors
quantized, the tokenizer as metadata), from a tiny Hugging Face model and a BPE tokenizer trained here.

Entry point: write_gguf(hf_model, tokenizer_folder, path, ...) -> path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

LLAMA_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in LLAMA_NAMES:
        return LLAMA_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, param = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{param}"


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of query/key rows (rotary halves interleaved per head)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_gguf(model, tokenizer_folder: Path, path: Path, quant: str = "Q8_0", arch: str = "llama",
               pre: str = "gpt-2", tokenizer_model: str = "gpt2", extra_tensor: np.ndarray | None = None) -> Path:
    """Write `model` (a transformers Llama or Qwen2) as a GGUF file; matrices in `quant`, norms in F32."""
    import gguf
    from gguf import GGMLQuantizationType, quants

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    _add_tokenizer(writer, tokenizer_folder, tokenizer_model, pre)
    kind = GGMLQuantizationType[quant]
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = value.detach().float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            array = permute(array, heads)
        if array.ndim == 2 and kind != GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name(name), array)
    if extra_tensor is not None:
        writer.add_tensor("blk.0.attn_extra.weight", extra_tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer, folder: Path, tokenizer_model: str, pre: str) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = dict(spec["model"]["vocab"])
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    specials = {added["content"] for added in spec["added_tokens"] if added["special"]}
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"]["merges"]]
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in specials else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[config["bos_token"]])
    writer.add_eos_token_id(vocab[config["eos_token"]])
    writer.add_pad_token_id(vocab[config["pad_token"]])
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_hf_model(family: str, vocab_size: int, tied: bool = False, seed: int = 0):
    """A random transformers Llama or Qwen2 with biases and norms perturbed, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(seed)
    classes = (Qwen2ForCausalLM, Qwen2Config) if family == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    model = classes[0](classes[1](**values))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()
