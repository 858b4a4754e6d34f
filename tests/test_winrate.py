"""Length-controlled win rate: on synthetic preferences with a known length bias the GLM removes it (raw does
not), true quality differences survive, position swapping cancels a judge's order bias, and `tetra eval winrate`
runs end to end against a served judge."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SAMPLE_TEXT
from hf_factory import save_chat_tokenizer, save_tiny_base
from tetra.cli import main
from tetra.eval.judge import letter_probability, swapped_preference
from tetra.eval.winrate_glm import fit_win_rates


def _synthetic(theta: float, phi: float, mean_length_gap: float, n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    gaps = rng.normal(mean_length_gap, 400.0, n)
    logits = theta + phi * np.tanh(gaps / gaps.std())
    return list(1 / (1 + np.exp(-logits))), list(gaps)


def test_lc_removes_a_pure_length_bias_and_raw_does_not():
    preferences, gaps = _synthetic(theta=0.0, phi=2.0, mean_length_gap=300.0)
    rates = fit_win_rates(preferences, gaps)
    assert rates.raw_win_rate > 65  # the judge rewarded length alone
    assert abs(rates.lc_win_rate - 50) < 3 and rates.length_coefficient == pytest.approx(2.0, abs=0.2)
    assert 0 < rates.lc_standard_error < 5


def test_a_real_quality_difference_survives_length_control():
    preferences, gaps = _synthetic(theta=1.0, phi=0.0, mean_length_gap=0.0)
    rates = fit_win_rates(preferences, gaps)
    expected = 100 / (1 + np.exp(-1.0))
    assert rates.lc_win_rate == pytest.approx(expected, abs=2) and rates.raw_win_rate == pytest.approx(expected, abs=2)
    both, gaps = _synthetic(theta=1.0, phi=2.0, mean_length_gap=-300.0)  # better but shorter: raw underrates it
    rates = fit_win_rates(both, gaps)
    assert rates.raw_win_rate < expected - 8 and rates.lc_win_rate == pytest.approx(expected, abs=3)


def test_position_swapping_cancels_order_bias():
    always_first = lambda instruction, first, second: 1.0  # noqa: E731
    assert swapped_preference(always_first, "q", "long answer", "short") == (0.5, 0.5)
    prefers_long = lambda instruction, first, second: float(len(first) > len(second))  # noqa: E731
    assert swapped_preference(prefers_long, "q", "long answer", "short") == (1.0, 0.0)
    assert letter_probability([{"token": " A", "logprob": np.log(0.3)}, {"token": "B", "logprob": np.log(0.1)}],
                              "") == pytest.approx(0.75)
    assert letter_probability([], "B, because") == 0.0 and letter_probability([], "neither") == 0.5


def _outputs(path, answers):
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in answers))
    return path


def test_cli_with_a_served_checkpoint_as_judge(tmp_path, capsys):
    save_chat_tokenizer(tmp_path / "tokenizer", SAMPLE_TEXT)
    judge = save_tiny_base(tmp_path / "judge", tmp_path / "tokenizer", max_positions=256)
    questions = ["def add(a, b)?", "import os?", "print(name)?", "for name in?"]
    mine = _outputs(tmp_path / "mine.jsonl", [(q, "return a + b, clearly") for q in questions])
    base = _outputs(tmp_path / "base.jsonl", [(q, "no") for q in questions])
    assert main(["eval", "winrate", "--model-outputs", str(mine), "--baseline-outputs", str(base), "--judge",
                 str(judge), "--annotations", str(tmp_path / "notes.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["lc_win_rate"] <= 100 and result["instructions"] == 4
    notes = [json.loads(line) for line in (tmp_path / "notes.jsonl").read_text().splitlines()]
    assert len(notes) == 4 and all(0 <= note["preference"] <= 1 for note in notes)
    other = _outputs(tmp_path / "other.jsonl", [("something else?", "x"), (questions[0], "y")])
    assert main(["eval", "winrate", "--model-outputs", str(mine), "--baseline-outputs", str(other), "--judge",
                 str(judge)]) == 2
    assert "different instructions" in capsys.readouterr().err
