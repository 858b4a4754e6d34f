"""Tiny Hugging Face models of every supported family, built locally from a config (no downloads).

Entry point: build_hf_model(variant) -> transformers model; VARIANTS lists the names.
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 97

LLAMA_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa1": ("llama", {}),
    "llama-gqa2": ("llama", dict(num_key_value_heads=2)),
    "llama-gqa4-tied": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-rope-llama3": ("llama", dict(num_key_value_heads=2, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16), rope_theta=500000.0)),
    "llama-rope-linear": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    "llama-bias-headdim": ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=24)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2)),
    "qwen2-tied": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=None, head_dim=16)),
    "mistral-window": ("mistral", dict(num_key_value_heads=2, sliding_window=5, head_dim=16)),
    "gpt2": ("gpt2", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                          bos_token_id=1, eos_token_id=2)),
    "opt": ("opt", dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)),
}
# One variant per family, for the slower tests (generation, CLI).
FAMILY_VARIANTS = ["llama-gqa2", "qwen2", "mistral-window", "gpt2", "opt"]


def hf_config(variant: str) -> Any:
    """The transformers config object of a variant."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    family, overrides = VARIANTS[variant]
    if family in ("gpt2", "opt"):
        return {"gpt2": GPT2Config, "opt": OPTConfig}[family](**overrides)
    values = {**LLAMA_BASE, **overrides}
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family](**values)


def build_hf_model(variant: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A randomly initialized transformers causal LM in eval mode; biases randomized so they are tested too."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(variant), attn_implementation="eager")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.to(dtype).eval()


def save_hf_folder(folder, variant: str, vocab_size: int = 96) -> str:
    """A tiny transformers model (biases and norms perturbed) with a vocabulary every test grid divides, saved as a
    Hugging Face folder with safetensors."""
    from transformers import AutoModelForCausalLM

    config = hf_config(variant)
    config.vocab_size = vocab_size
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def save_tiny_base(folder, tokenizer_folder, max_positions: int = 128):
    """A tiny tetra Llama (seed 0) sized to a tokenizer, saved as a Hugging Face folder with that tokenizer: the
    base model fine-tuning tests start from."""
    from tetra.data.tokenizer import TextTokenizer
    from tetra.model import ModelConfig, Transformer
    from tetra.model.io import save_hf_model

    tokenizer = TextTokenizer.load(tokenizer_folder)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, max_position_embeddings=max_positions,
                                    eos_token_id=tokenizer.eos_id))
    model.init_weights(0.1)
    return save_hf_model(model, folder, tokenizer_from=tokenizer_folder)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_chat_tokenizer(folder, texts, vocab_size: int = 400):
    """A BPE tokenizer trained on texts with ChatML's two special tokens and template (EOS = <|im_end|>)."""
    from tokenizers import AddedToken

    from tetra.data.tokenizer import train_bpe

    tokenizer = train_bpe(texts, vocab_size=vocab_size)
    tokenizer.backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                          for t in ("<|im_start|>", "<|im_end|>")])
    tokenizer.chat_template, tokenizer.eos_token = CHATML, "<|im_end|>"
    tokenizer.save(folder)
    return folder
