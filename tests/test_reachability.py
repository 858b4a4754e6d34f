"""The reachability task: exact shortest paths, questions at exactly the hop count asked for and balanced, data
deterministic by seed, an exact scorer, and the commands end to end on a recurrent-depth model."""

from __future__ import annotations

import json
import random

import pytest

from tetra.cli import main
from tetra.data.arithmetic import character_tokenizer
from tetra.data.reachability import TASK_KEY, ReachabilityTask, shortest_hops, write_reachability_data
from tetra.errors import DataError
from tetra.eval.multistep import evaluate_by_hops


def test_shortest_hops_on_a_known_graph():
    edges = [(0, 1), (1, 2), (2, 3), (0, 3), (4, 0)]
    assert shortest_hops(edges, 0, 3) == 1 and shortest_hops(edges, 1, 3) == 2 and shortest_hops(edges, 4, 2) == 3
    assert shortest_hops(edges, 3, 0) == 0  # unreachable


def _parse(prompt: str) -> tuple[list[tuple[int, int]], int, int]:
    edges_text, question = prompt.rstrip("=").split(":")
    source, target = question.split("?")
    return [tuple(map(int, edge.split(">"))) for edge in edges_text.split(",")], int(source), int(target)


def test_questions_have_the_hops_asked_for_and_are_balanced():
    task, rng = ReachabilityTask(10, 12, 4), random.Random(0)
    for hops in range(0, 7):
        for _ in range(20):
            prompt, answer, got = task.problem(rng, hops)
            edges, source, target = _parse(prompt)
            assert len(edges) == 12 and shortest_hops(edges, source, target) == hops == got
            assert answer == ("1" if hops else "0")
    drawn = [task.problem(rng)[2] for _ in range(2000)]
    assert 0.45 < drawn.count(0) / len(drawn) < 0.55 and max(drawn) == 4


def test_data_is_deterministic_and_bad_sizes_are_named(tmp_path):
    for name in ("a", "b"):
        write_reachability_data(tmp_path / name, ReachabilityTask(), 200, seed=5)
    assert (tmp_path / "a" / "train-00000.bin").read_bytes() == (tmp_path / "b" / "train-00000.bin").read_bytes()
    with pytest.raises(DataError, match="--nodes"):
        ReachabilityTask(nodes=11).check()
    with pytest.raises(DataError, match="--max-hops"):
        ReachabilityTask(nodes=5, max_hops=5).check()


def test_the_scorer_is_exact(monkeypatch):
    from tetra.eval import multistep
    from tetra.model import ModelConfig, Transformer

    task = ReachabilityTask(8, 10, 3)
    tokenizer = character_tokenizer(task, TASK_KEY)

    def oracle(model, prompts, max_new_tokens, **kwargs):
        answers = []
        for prompt in prompts:
            edges, source, target = _parse(tokenizer.decode(prompt))
            answers.append(tokenizer.encode("1" if shortest_hops(edges, source, target) else "0",
                                            add_special_tokens=False))
        return answers

    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, n_layers=1, n_heads=2))
    monkeypatch.setattr(multistep, "generate_ids", oracle)
    assert evaluate_by_hops(model, tokenizer, task, [0, 1, 2, 5], samples=10) == {0: 1.0, 1: 1.0, 2: 1.0, 5: 1.0}
    monkeypatch.setattr(multistep, "generate_ids", lambda model, prompts, *a, **k: [
        tokenizer.encode("1", add_special_tokens=False)] * len(prompts))
    assert evaluate_by_hops(model, tokenizer, task, [0, 2], samples=10) == {0: 0.0, 2: 1.0}


def test_data_train_and_eval_at_any_recurrence(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["data", "reachability", "--nodes", "6", "--edges", "7", "--max-hops", "3", "--examples", "300",
                 "--out", str(data)]) == 0
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\npath = "{data}"\nseq_len = 64\n[model]\nhidden_size = 32\nn_layers = 3\nn_heads = 2\n'
                      'recurrent_prelude = 1\nrecurrent_core = 1\nrecurrent_coda = 1\nmean_recurrence = 3\n'
                      'backprop_depth = 2\n[train]\nmax_steps = 2\nbatch_size = 4\nwarmup_steps = 1\n'
                      f'[eval]\nevery = 0\n[run]\ndir = "{run}"\n')
    assert main(["train", str(config), "--no-progress"]) == 0
    checkpoint = run / "checkpoints" / "step-0000002"
    capsys.readouterr()
    assert main(["eval", "reachability", str(checkpoint), "--hops", "0-4", "--samples", "3", "--recurrence", "5",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(report["accuracy"]) == ["0", "1", "2", "3", "4"] and report["mean_iterations"] == 5
    assert main(["eval", "reachability", str(checkpoint), "--hops", "0-9"]) == 2
    assert "--hops" in capsys.readouterr().err
