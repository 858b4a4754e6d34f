"""CUDA checks: bf16 parity with transformers and greedy decoding on a GPU. Skipped where no GPU is visible."""

from __future__ import annotations

import pytest
import torch

from hf_factory import FAMILY_VARIANTS, VOCAB
from tetra.infer.generate import generate_ids
from tetra.model.io import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_bf16_logits_match_transformers_on_cuda(variant, hf_folder):
    hf_model, folder = hf_folder(variant)
    hf_model = hf_model.to("cuda", torch.bfloat16)
    model = load_model(folder, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(3, VOCAB, (2, 33), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        expected, actual = hf_model(ids).logits.float(), model(ids).float()
    # bf16 keeps 8 bits of mantissa: compare relative to the logit scale.
    assert (actual - expected).abs().max().item() <= 0.05 * expected.abs().max().item()


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_fp32_greedy_equals_transformers_on_cuda(variant, hf_folder):
    hf_model, folder = hf_folder(variant)
    hf_model = hf_model.cuda()
    model = load_model(folder, device="cuda")
    prompt = [5, 17, 33, 8, 60, 12, 9]
    out = hf_model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=16, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    assert generate_ids(model, [prompt], 16) == [out[0, len(prompt):].tolist()]
