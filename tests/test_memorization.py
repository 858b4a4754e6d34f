"""Memorization metrics: exact match, RougeL and the longest matching prefix, batched extraction, and the command."""

from __future__ import annotations

import json

import pytest
import torch

from tetra.cli import main
from tetra.eval.memorization import (
    longest_matching_prefix,
    measure_memorization,
    rouge_l,
    split_document,
    suffix_losses,
)
from tetra.infer.generate import generate_ids
from tetra.model.io import load_model


def test_longest_matching_prefix_and_rouge_l():
    assert longest_matching_prefix([1, 2, 3, 9], [1, 2, 3, 4]) == 3
    assert longest_matching_prefix([5, 2], [1, 2]) == 0
    assert longest_matching_prefix([1, 2], [1, 2]) == 2
    assert rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert rouge_l([1, 3, 4, 5], [1, 2, 3, 4]) == pytest.approx(0.75)  # LCS 1 3 4
    assert rouge_l([4, 3, 2, 1], [1, 2, 3, 4]) == pytest.approx(0.25)  # order matters
    assert rouge_l([7, 8], [1, 2, 3, 4]) == 0.0
    assert rouge_l([1, 2], [1, 2, 3, 4]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_split_keeps_the_suffix_and_the_nearest_prefix_tokens():
    assert split_document(list(range(10)), 4, 3) == ([3, 4, 5], [6, 7, 8, 9])
    assert split_document(list(range(4)), 4, 3) is None


def test_a_model_reproduces_its_own_greedy_continuations_and_not_altered_ones(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(0, vocab, (length,), generator=generator).tolist() for length in (3, 17, 9, 30, 5)]
    continuations = [generate_ids(model, [prefix], 12)[0] for prefix in prefixes]  # one at a time: no padding
    own = [prefix + continuation for prefix, continuation in zip(prefixes, continuations, strict=True)]
    report = measure_memorization(model, own + [[1, 2, 3]], suffix_tokens=12, batch_size=2)
    assert report.exact_match_rate == 1.0 and report.mean_rouge_l == 1.0 and report.mean_longest_match == 12
    assert report.documents == 5 and report.skipped == 1 and report.histogram[12] == 5
    own_loss = report.mean_suffix_loss
    altered = [document[:-7] + [(document[-7] + 1) % vocab] + document[-6:] for document in own]
    report = measure_memorization(model, altered, suffix_tokens=12, batch_size=3)
    assert report.exact_match_rate == 0.0 and report.mean_longest_match == 5 and report.histogram[5] == 5
    assert 0.5 < report.mean_rouge_l < 1.0 and report.mean_suffix_loss > own_loss


def test_suffix_loss_of_a_padded_batch_equals_one_document_at_a_time(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    pairs = [([5, 9, 2, 7, 1, 3], [4, 8, 6]), ([11, 3], [2, 2, 9])]
    together = suffix_losses(model, pairs)
    for pair, loss in zip(pairs, together, strict=True):
        ids = torch.tensor([pair[0] + pair[1]])
        expected = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0, -3:], ids[0, -3:]).item()
        assert loss == pytest.approx(expected, rel=1e-4)


def test_the_command_reports_and_plots(tiny_checkpoint, tmp_path, capsys):
    documents = tmp_path / "docs.jsonl"
    texts = ["def add(a, b):\n    return a + b\n" * 3, "import os\nimport sys\n" * 4, "short"]
    documents.write_text("\n".join(json.dumps({"text": text}) for text in texts) + "\n")
    plot = tmp_path / "hist.png"
    assert main(["memorization", str(tiny_checkpoint), "--documents", str(documents), "--suffix-tokens", "4",
                 "--plot", str(plot), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["documents"] == 2 and result["skipped"] == 1 and len(result["per_document"]) == 2
    assert sum(result["histogram"]) == 2 and len(result["histogram"]) == 5
    assert 0 <= result["exact_match_rate"] <= 1 and plot.stat().st_size > 1000
    assert main(["memorization", str(tiny_checkpoint), "--documents", str(documents), "--suffix-tokens", "4",
                 "--plot", str(plot)]) == 0
    assert "exact match" in capsys.readouterr().out


def test_bad_input_is_named(tiny_checkpoint, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["memorization", str(tiny_checkpoint), "--documents", str(missing)]) == 2
    assert "No documents found" in capsys.readouterr().err
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "hi"}) + "\n")
    assert main(["memorization", str(tiny_checkpoint), "--documents", str(short), "--plot",
                 str(tmp_path / "p.png")]) == 2
    assert "No document has more than 50 tokens" in capsys.readouterr().err
    assert main(["memorization", str(tiny_checkpoint), "--documents", str(short), "--suffix-tokens", "0"]) == 2
