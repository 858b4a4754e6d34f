"""The running-value task: values computed left to right modulo 10, questions with exactly the operations asked
for, data deterministic by seed, an exact scorer, the commands end to end on a looped model, and bad input."""

from __future__ import annotations

import json
import random

import pytest

from tetra.cli import main
from tetra.data.arithmetic import character_tokenizer
from tetra.data.running_value import TASK_KEY, RunningValueTask, evaluate_program, write_running_value_data
from tetra.errors import DataError
from tetra.eval.multistep import evaluate_by_hops


def test_values_are_taken_left_to_right_modulo_ten():
    assert evaluate_program("3+4*2-5=") == 9  # ((3 + 4) * 2 - 5) mod 10, not 3 + 8 - 5
    assert evaluate_program("2-7") == 5 and evaluate_program("9*9*9") == 9 and evaluate_program("4") == 4


def test_questions_have_the_operations_asked_for():
    task, rng = RunningValueTask(6), random.Random(0)
    for hops in (1, 3, 12):
        prompt, answer, got = task.problem(rng, hops)
        assert got == hops and len(prompt) == 2 * hops + 2 and prompt.endswith("=")
        assert answer == str(evaluate_program(prompt))
    drawn = [task.problem(rng)[2] for _ in range(6000)]  # easy weighting: P(h) ~ 1/h
    assert set(drawn) == set(range(1, 7)) and 1.7 < drawn.count(1) / drawn.count(2) < 2.3
    uniform = [RunningValueTask(6, "uniform").problem(rng)[2] for _ in range(6000)]
    assert 0.8 < uniform.count(1) / uniform.count(6) < 1.25
    answers = [task.problem(rng, 4)[1] for _ in range(3000)]
    assert len(set(answers)) == 10  # every digit is an answer


def test_data_is_deterministic_and_bad_sizes_are_named(tmp_path):
    for name in ("a", "b"):
        write_running_value_data(tmp_path / name, RunningValueTask(5), 300, seed=2)
    assert (tmp_path / "a" / "train-00000.bin").read_bytes() == (tmp_path / "b" / "train-00000.bin").read_bytes()
    write_running_value_data(tmp_path / "c", RunningValueTask(5), 300, seed=3)
    assert (tmp_path / "a" / "train-00000.bin").read_bytes() != (tmp_path / "c" / "train-00000.bin").read_bytes()
    with pytest.raises(DataError, match="--max-hops"):
        RunningValueTask(0).check()
    with pytest.raises(DataError, match="--weighting"):
        RunningValueTask(3, "hard").check()


def test_the_scorer_is_exact(monkeypatch):
    from tetra.eval import multistep
    from tetra.model import ModelConfig, Transformer

    task = RunningValueTask(4)
    tokenizer = character_tokenizer(task, TASK_KEY, "0123456789+-*=")
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, n_layers=1, n_heads=2))

    def oracle(model, prompts, max_new_tokens, **kwargs):
        return [tokenizer.encode(str(evaluate_program(tokenizer.decode(p))), add_special_tokens=False)
                for p in prompts]

    monkeypatch.setattr(multistep, "generate_ids", oracle)
    assert evaluate_by_hops(model, tokenizer, task, [1, 2, 9], samples=20) == {1: 1.0, 2: 1.0, 9: 1.0}
    monkeypatch.setattr(multistep, "generate_ids", lambda model, prompts, *a, **k: [
        tokenizer.encode("0", add_special_tokens=False)] * len(prompts))
    zeros = evaluate_by_hops(model, tokenizer, task, [3], samples=200)[3]
    assert 0.0 < zeros < 0.5  # right only where the answer is 0


def test_data_train_and_eval_a_looped_model_at_any_recurrence(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["data", "running-value", "--max-hops", "3", "--examples", "300", "--out", str(data)]) == 0
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\npath = "{data}"\nseq_len = 64\n[model]\nhidden_size = 32\nn_layers = 1\nn_heads = 2\n'
                      'loop = 2\n[train]\nmax_steps = 2\nbatch_size = 4\nwarmup_steps = 1\nprogressive_loss = 0.5\n'
                      f'[eval]\nevery = 0\n[run]\ndir = "{run}"\n')
    assert main(["train", str(config), "--no-progress"]) == 0
    checkpoint = run / "checkpoints" / "step-0000002"
    capsys.readouterr()
    assert main(["eval", "running-value", str(checkpoint), "--hops", "1-5", "--samples", "3", "--recurrence", "4",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(report["accuracy"]) == ["1", "2", "3", "4", "5"] and report["mean_iterations"] == 4
    assert main(["eval", "running-value", str(checkpoint), "--hops", "0-3"]) == 2
    assert "--hops" in capsys.readouterr().err
    assert main(["eval", "reachability", str(checkpoint), "--hops", "1-2", "--recurrence", "0"]) == 2
