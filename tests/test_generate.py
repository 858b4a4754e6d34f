"""Generation: greedy equals transformers token for token, batching with left padding, EOS, sampling controls."""

from __future__ import annotations

import pytest
import torch

from hf_factory import FAMILY_VARIANTS, VOCAB
from tetra.infer.generate import generate_ids
from tetra.infer.sampling import SamplingConfig, filter_logits
from tetra.model import KVCache
from tetra.model.io import load_model

EOS = 2
PROMPTS = [[5, 17, 33, 8, 60, 12, 9], [44, 3], [70, 71, 72, 73, 74]]


def _until_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def _hf_greedy(hf_model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    longest = max(map(len, prompts))
    ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=EOS,
                            pad_token_id=0)
    return [_until_eos(row[longest:].tolist()) for row in out]


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_greedy_equals_transformers_generate(variant, hf_folder):
    hf_model, folder = hf_folder(variant)
    model = load_model(folder)
    for prompt in PROMPTS:
        expected = _hf_greedy(hf_model, [prompt], 24)
        assert generate_ids(model, [prompt], 24, eos_ids=[EOS]) == expected


@pytest.mark.parametrize("variant", ["llama-gqa2", "gpt2", "mistral-window"])
def test_left_padded_batch_equals_single_prompts_and_transformers(variant, hf_folder):
    hf_model, folder = hf_folder(variant)
    model = load_model(folder)
    batched = generate_ids(model, PROMPTS, 20, eos_ids=[EOS])
    assert batched == [generate_ids(model, [prompt], 20, eos_ids=[EOS])[0] for prompt in PROMPTS]
    assert batched == _hf_greedy(hf_model, PROMPTS, 20)


def test_cached_decoding_equals_full_forward(hf_folder):
    _, folder = hf_folder("llama-gqa4-tied")
    model = load_model(folder)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.config, 2, 12, torch.float32, "cpu")
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :5], kv_cache=cache)]
        steps += [model(ids[:, t: t + 1], kv_cache=cache, cache_start=t) for t in range(5, 12)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_stops_at_eos_and_keeps_it(hf_folder):
    _, folder = hf_folder("llama-gqa2")
    model = load_model(folder)
    free = generate_ids(model, [PROMPTS[0]], 16)[0]
    eos = free[5]
    stopped = generate_ids(model, [PROMPTS[0]], 16, eos_ids=[eos])[0]
    assert stopped == free[: free.index(eos) + 1]


def test_sampling_is_seeded_and_top_k_one_is_greedy(hf_folder):
    _, folder = hf_folder("qwen2")
    model = load_model(folder)
    sampling = SamplingConfig(temperature=1.5, top_p=0.95)
    first = generate_ids(model, PROMPTS, 16, sampling, seed=7)
    assert first == generate_ids(model, PROMPTS, 16, sampling, seed=7)
    assert first != generate_ids(model, PROMPTS, 16, sampling, seed=8)
    greedy = generate_ids(model, PROMPTS, 16)
    assert generate_ids(model, PROMPTS, 16, SamplingConfig(temperature=1.0, top_k=1), seed=3) == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)  # probabilities 0.64, 0.24, 0.09, 0.03
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.5))
    assert kept.tolist() == [[True, False, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=3, top_p=1.0))
    assert kept.tolist() == [[True, True, True, False]]


def test_end_of_turn_ids_from_generation_config_stop_generation(hf_folder):
    import json

    _, folder = hf_folder("llama-gqa2")
    free = generate_ids(load_model(folder), [PROMPTS[0]], 16)[0]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, free[4]]}))
    model = load_model(folder)
    assert model.config.eos_token_ids == sorted({EOS, free[4]})
    stopped = generate_ids(model, [PROMPTS[0]], 16, eos_ids=model.config.eos_token_ids)[0]
    assert stopped == free[: free.index(free[4]) + 1]
