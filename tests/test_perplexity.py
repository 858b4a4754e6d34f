"""`tetra eval perplexity`: the sliding window scores every token once, each from the history the stride promises
(checked against a token-by-token reference), short documents equal one full forward pass, and the command reads
prepared data and text."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_factory import VOCAB
from tetra.cli import main
from tetra.eval.perplexity import document_nll, perplexity_of, windows
from tetra.model import ModelConfig, Transformer


def _model(positions: str = "rope", max_positions: int = 64) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    positions=positions, max_position_embeddings=max_positions))
    model.init_weights(std=0.3)
    return model.eval()


@pytest.mark.parametrize("length,context,stride", [(50, 16, 16), (50, 16, 5), (17, 16, 1), (5, 16, 8), (33, 8, 7)])
def test_windows_score_each_token_once_with_enough_history(length, context, stride):
    scored = []
    for begin, end, first in windows(length, context, stride):
        assert end - begin <= context and begin <= first - 1
        if begin > 0:
            assert first - begin >= max(1, context - stride)  # history of the first token this window scores
        scored += range(first, end)
    assert scored == list(range(1, length))


def _reference_nll(model: Transformer, ids: list[int], context: int, stride: int) -> float:
    """Each token's NLL from exactly the history its window gives it, one forward pass per token."""
    total = 0.0
    for begin, end, first in windows(len(ids), context, stride):
        for position in range(first, end):
            with torch.no_grad():
                logits = model(torch.tensor([ids[begin:position]]))[0, -1]
            total -= torch.log_softmax(logits, -1)[ids[position]].item()
    return total


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_sliding_window_equals_a_token_by_token_reference(stride):
    model = _model()
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    total, count = document_nll(model, ids, context=8, stride=stride)
    assert count == 39
    assert total == pytest.approx(_reference_nll(model, ids, 8, stride), rel=1e-5)


def test_short_documents_equal_one_forward_and_learned_positions_slide():
    model = _model()
    ids = list(range(3, 23))
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    result = perplexity_of(model, [ids], context=32, stride=16)
    assert result.nll == pytest.approx(loss, rel=1e-5) and result.perplexity == pytest.approx(math.exp(loss))
    learned = _model("learned", max_positions=16)
    long = perplexity_of(learned, [list(range(3, 90))], context=16, stride=8)  # 87 tokens through 16 positions
    assert long.tokens == 86 and math.isfinite(long.nll)


def test_cli_on_prepared_data_and_text(tiny_checkpoint, prepared_data, tmp_path, capsys):
    assert main(["eval", "perplexity", str(tiny_checkpoint), "--data", str(prepared_data), "--json"]) == 0
    prepared = json.loads(capsys.readouterr().out)
    assert prepared["tokens"] > 100 and prepared["perplexity"] > 1 and prepared["bits_per_byte"] is None
    text = tmp_path / "notes.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 30)
    assert main(["eval", "perplexity", str(tiny_checkpoint), "--data", str(text), "--context", "32", "--stride",
                 "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["documents"] == 1 and result["context"] == 32 and result["bits_per_byte"] > 0
    assert main(["eval", "perplexity", str(tiny_checkpoint), "--data", str(text), "--context", "32", "--stride",
                 "64"]) == 2
    assert "--stride" in capsys.readouterr().err
