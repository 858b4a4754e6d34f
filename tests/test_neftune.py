"""NEFTune: noise of scale alpha / sqrt(L * d) per document (packing and padding do not change it), uniform over
its whole support, none at evaluation, and training with it off bit-identical to training without it."""

from __future__ import annotations

import json

import pytest
import torch

from tetra.cli import main
from tetra.model import ModelConfig, Transformer
from tetra.train.neftune import attach_neftune

WIDTH = 64


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, hidden_size=WIDTH, n_layers=1, n_heads=4))


def _noise(model: Transformer, ids: torch.Tensor, documents: torch.Tensor | None) -> torch.Tensor:
    """The noise the hook adds to the embedding output during one forward pass."""
    captured = {}
    handle = model.embed.register_forward_hook(lambda module, inputs, output: captured.update(out=output))
    extra = {} if documents is None else {"document_ids": documents}
    with torch.no_grad():
        model(ids, **extra)
    handle.remove()
    return captured["out"] - model.embed.weight.detach()[ids]


def test_noise_scale_and_support_per_document():
    model = _model().train()
    attach_neftune(model, alpha=5.0)
    ids = torch.randint(0, 50, (2, 600), generator=torch.Generator().manual_seed(0))
    documents = torch.cat([torch.zeros(2, 100), torch.ones(2, 400), torch.full((2, 100), -1)], dim=1).long()
    noise = _noise(model, ids, documents)
    for first, last, length in ((0, 100, 100), (100, 500, 400)):
        bound = 5.0 / (length * WIDTH) ** 0.5
        piece = noise[:, first:last].abs() / bound
        assert piece.max() <= 1.0 + 1e-5 and piece.max() > 0.99  # the whole support U(-1, 1) is used
        assert abs(float(piece.mean()) - 0.5) < 0.02  # |U(-1, 1)| has mean 1/2
    assert torch.equal(noise[:, 500:], torch.zeros_like(noise[:, 500:]))  # padding gets none


def test_packing_does_not_change_a_documents_noise_scale():
    """The same 100-token document, alone in a row or packed with a 300-token one, gets the same noise scale."""
    model = _model().train()
    attach_neftune(model, alpha=10.0)
    ids = torch.randint(0, 50, (1, 400), generator=torch.Generator().manual_seed(1))
    alone = _noise(model, ids[:, :100], None)
    packed = _noise(model, ids, torch.cat([torch.zeros(1, 100), torch.ones(1, 300)], dim=1).long())[:, :100]
    bound = 10.0 / (100 * WIDTH) ** 0.5
    for noise in (alone, packed):
        assert noise.abs().max() <= bound * (1 + 1e-5) and noise.abs().max() > 0.99 * bound


def test_evaluation_is_untouched():
    model = _model()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model.eval()(ids)
        attach_neftune(model, alpha=15.0)
        assert torch.equal(model.eval()(ids), before)
        assert not torch.equal(model.train()(ids), before)


@pytest.mark.parametrize("alpha", [0.0, 5.0])
def test_off_is_bit_identical_and_on_changes_training(alpha, prepared_data, tmp_path):
    def run(name: str, *overrides: str) -> list[float]:
        args = ["train", "configs/tiny-stdlib.toml", f"data.path={prepared_data}", "data.seq_len=32",
                "train.max_steps=3", "train.batch_size=2", "train.warmup_steps=1", "model.n_layers=1",
                "model.hidden_size=32", "model.n_heads=2", "eval.every=0", "run.log_every=1", "train.precision=fp32",
                f"run.dir={tmp_path / name}", "--no-progress", *overrides]
        assert main(args) == 0
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    plain = run("plain")
    noisy = run("noisy", f"train.neftune.alpha={alpha}")
    assert (plain == noisy) == (alpha == 0.0)
