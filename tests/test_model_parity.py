"""Logit parity with Hugging Face transformers for every family, on random ids, with and without padding."""

from __future__ import annotations

import pytest
import torch

from hf_factory import VARIANTS, VOCAB
from tetra.model.io import load_model

TOLERANCE = 1e-4


def _random_ids(batch: int = 2, length: int = 19, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, hf_folder):
    hf_model, folder = hf_folder(variant)
    model = load_model(folder)
    ids = _random_ids()
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = model(ids)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("variant", ["llama-gqa2", "qwen2", "mistral-window", "gpt2", "opt"])
def test_left_padded_logits_match_transformers(variant, hf_folder):
    hf_model, folder = hf_folder(variant)
    model = load_model(folder)
    ids = _random_ids(batch=3, length=12)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hf_options = {} if variant == "opt" else {"position_ids": positions}
        expected = hf_model(ids, attention_mask=mask, **hf_options).logits
        actual = model(ids, attention_mask=mask)
    real = mask.bool()
    assert torch.isfinite(actual).all()
    assert (actual[real] - expected[real]).abs().max().item() <= TOLERANCE


def test_llama3_rope_scaling_changes_long_positions(hf_folder):
    """Guard against scaling being silently ignored: it must matter past the original context."""
    _, folder = hf_folder("llama-rope-llama3")
    scaled = load_model(folder)
    plain_config = scaled.config.to_dict() | {"rope_scaling": {"rope_type": "default"}}
    from tetra.model import ModelConfig, Transformer

    plain = Transformer(ModelConfig.from_dict(plain_config))
    plain.load_state_dict(scaled.state_dict())
    ids = _random_ids(batch=1, length=40)
    with torch.no_grad():
        assert (scaled(ids) - plain(ids)).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["llama-gqa2", "llama-bias-headdim", "qwen2-tied", "mistral-window"])
def test_weight_gradients_match_transformers(variant, hf_folder):
    """Training parity, not only logits: every weight's gradient of the same loss equals transformers' (this is
    what covers the hand-written backward passes, such as rotary's)."""
    from tetra.model.hf_weights import tetra_to_hf_state

    hf_model, folder = hf_folder(variant)
    model = load_model(folder)
    ids = _random_ids(batch=2, length=23)
    hf_logits = hf_model(ids).logits
    torch.nn.functional.cross_entropy(hf_logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    gradients = {name: p.grad for name, p in model.named_parameters()}
    tied = model.config.tie_embeddings
    expected = {name: p.grad for name, p in hf_model.named_parameters() if p.grad is not None}
    actual = tetra_to_hf_state(model.config.family, gradients, tied)
    assert expected.keys() == actual.keys()
    for name, gradient in expected.items():
        scale = gradient.abs().max().item() + 1e-12
        assert (actual[name] - gradient).abs().max().item() <= 1e-4 * scale, name

