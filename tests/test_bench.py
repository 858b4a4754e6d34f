"""The generated benchmark: a seed fixes the questions and another seed changes them; every task's scorer gives 1 to
a correct answer and 0 to a wrong one (math symbolically, hidden tests in a limited subprocess without network);
means go task -> category -> overall; `tetra bench` runs against a checkpoint, an endpoint and an answers file."""

from __future__ import annotations

import json

import pytest

from conftest import SAMPLE_TEXT
from hf_factory import save_chat_tokenizer, save_tiny_base
from tetra.cli import main
from tetra.eval.bench.benchmark import ALL_TASKS, generate_questions, score_answers, summarize
from tetra.eval.bench.coding_tasks import run_tests
from tetra.eval.bench.reasoning_tasks import web_of_lies, zebra

CATEGORIES = {"math", "reasoning", "data_analysis", "language", "instruction_following", "coding"}


def test_seeds_fix_the_questions():
    first, again, other = generate_questions(7, 3), generate_questions(7, 3), generate_questions(8, 3)
    assert first == again
    assert {q["category"] for q in first} == CATEGORIES and len(first) == 3 * len(ALL_TASKS)
    changed = sum(a["prompt"] != b["prompt"] for a, b in zip(first, other, strict=True))
    assert changed >= 0.8 * len(first)


def _satisfying_text(constraints: list[dict]) -> str:
    """A text that meets IFEval-style constraints, built from them."""
    words = ["tea"]
    for c in constraints:
        if c["kind"] == "keyword":
            words += [c["word"]] * c["n"]
    lines = [" ".join(words)]
    bullets = next((c["n"] for c in constraints if c["kind"] == "bullets"), 0)
    lines += ["* point"] * bullets
    ending = next((c["text"] for c in constraints if c["kind"] == "ends_with"), "")
    text = "\n".join(lines) + ("\n" + ending if ending else "")
    return text.lower() if any(c["kind"] == "lowercase" for c in constraints) else text


def _correct(question: dict) -> str:
    truth, task = question["truth"], question["task"]
    if task in ("table_reformat", "table_join"):
        return "```json\n" + "\n".join(json.dumps(row) for row in truth) + "\n```"
    if task == "constraints":
        return _satisfying_text(truth)
    if task == "functions":
        table = {json.dumps(c["args"]): c["expected"] for c in truth["cases"]}
        return (f"```python\nimport json\n_TABLE = {table!r}\ndef {truth['function']}(*args):\n"
                "    return _TABLE[json.dumps(list(args))]\n```")
    return f"Some working first.\nAnswer: {truth}"


def test_correct_answers_score_one_and_wrong_ones_zero():
    questions = generate_questions(3, 4)
    perfect = score_answers(questions, {q["id"]: _correct(q) for q in questions})
    constraint_scores = [row["score"] for row in perfect if row["task"] == "constraints"]
    assert all(row["score"] == 1.0 for row in perfect if row["task"] != "constraints"), \
        [row for row in perfect if row["score"] < 1]
    assert min(constraint_scores) >= 0.5 and max(constraint_scores) == 1.0  # lowercase + ending can conflict
    wrong = score_answers(questions, {q["id"]: "Answer: 12345" for q in questions})
    assert all(row["score"] <= 0.2 for row in wrong if row["task"] != "constraints")
    assert summarize(wrong)["overall"] < 0.3 < summarize(perfect)["overall"]


def test_symbolic_math_and_reasoning_solutions():
    from tetra.eval.bench.math_tasks import _equivalent

    assert _equivalent("so \\boxed{(x+4)(x+5)}", "x**2 + 9*x + 20") == 1.0
    assert _equivalent("Answer: x^2+9x+20", "x**2 + 9*x + 20") == 1.0
    assert _equivalent("Answer: x^2+9x+21", "x**2 + 9*x + 20") == 0.0
    assert _equivalent("Answer: __import__('os').getcwd()", "3") == 0.0  # never evaluated
    import random

    prompt, truth = web_of_lies(random.Random(0))
    assert truth in ("yes", "no") and prompt.count(" says ") >= 2
    prompt, truth = zebra(random.Random(1))
    assert truth in ("cat", "dog", "fish") and "Which pet" in prompt


def test_code_runner_limits():
    cases = [{"args": [2], "expected": 4}, {"args": [3], "expected": 9}]
    assert run_tests("def f(n):\n    return n * n\n", "f", cases) == 1.0
    assert run_tests("def f(n):\n    return n + 2\n", "f", cases) == 0.5
    assert run_tests("def f(n):\n    raise ValueError\n", "f", cases) == 0.0
    assert run_tests("this is not python", "f", cases) == 0.0
    network = "import socket\ndef f(n):\n    socket.socket().close()\n    return n * n\n"  # fine outside the runner
    assert run_tests(network, "f", cases) == 0.0


def test_summary_means_go_task_then_category_then_overall():
    rows = [{"task": "a", "category": "x", "score": 1.0}, {"task": "a", "category": "x", "score": 0.0},
            {"task": "b", "category": "x", "score": 1.0}, {"task": "c", "category": "y", "score": 0.0}]
    summary = summarize(rows)
    assert summary["tasks"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert summary["categories"] == {"x": 0.75, "y": 0.0} and summary["overall"] == pytest.approx(0.375)


def test_cli_generate_and_score_three_ways(tmp_path, capsys):
    folder = tmp_path / "bench"
    assert main(["bench", "generate", "--seed", "5", "--out", str(folder), "--per-task", "1"]) == 0
    questions = [json.loads(line) for line in (folder / "questions.jsonl").read_text().splitlines()]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"id": q["id"], "answer": _correct(q)}) + "\n" for q in questions))
    capsys.readouterr()
    assert main(["bench", "score", str(folder), "--answers", str(answers), "--name", "perfect", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"] > 0.9
    save_chat_tokenizer(tmp_path / "tokenizer", SAMPLE_TEXT)
    model = save_tiny_base(tmp_path / "model", tmp_path / "tokenizer", max_positions=1024)
    assert main(["bench", "score", str(folder), str(model), "--name", "tiny", "--max-new-tokens", "8",
                 "--json"]) == 0
    tiny = json.loads(capsys.readouterr().out)
    assert 0 <= tiny["overall"] < 0.5 and set(tiny["categories"]) == CATEGORIES
    assert (folder / "scores-tiny.json").is_file() and (folder / "answers-tiny.jsonl").is_file()

    from tetra.data.tokenizer import TextTokenizer
    from tetra.model.io import load_model
    from tetra.serve.listen import BackgroundServer
    from tetra.serve.server import Server

    with BackgroundServer(Server(load_model(model), TextTokenizer.load(model), "tiny")) as url:
        assert main(["bench", "score", str(folder), "--endpoint", url + "/v1", "--name", "served",
                     "--max-new-tokens", "8", "--json"]) == 0
    served = json.loads(capsys.readouterr().out)
    assert served["tasks"] == pytest.approx(tiny["tasks"])  # greedy, same model: the same scores either way
    assert main(["bench", "score", str(tmp_path / "nowhere"), "--answers", str(answers)]) == 2
    assert main(["bench", "score", str(folder)]) == 2
    assert "exactly one source" in capsys.readouterr().err
