"""Instruction data from one prompt: the near-duplicate filter, the pipeline's filtering and resumption against a
scripted endpoint, and `tetra data generate --endpoint` against `tetra serve`, its output read by `tetra data
prepare --format chat`."""

from __future__ import annotations

import json

import pytest

from conftest import SAMPLE_TEXT
from hf_factory import save_chat_tokenizer, save_tiny_base
from tetra.cli import main
from tetra.data import instructions
from tetra.data.dedup import NearDuplicateIndex
from tetra.data.instructions import InstructionPlan, generate_instructions

SENTENCE = "how do I read a large csv file in python without loading all of it into memory at once please"


def test_task_cleaning():
    assert instructions._clean_task("Here's a new question:\n\n\"How do I sort a list?\"") == "How do I sort a list?"
    assert instructions._clean_task("Question: What is a set?\nExtra text") == "What is a set?"
    assert instructions._clean_task("The answer might be something like:") == ""


def test_near_duplicate_index():
    index = NearDuplicateIndex(threshold=0.7)
    assert index.add(SENTENCE)
    assert not index.add(SENTENCE.upper() + "!")  # the same text, normalized
    assert not index.add(SENTENCE.replace("please", "thanks"))  # one word changed: Jaccard 0.87
    assert index.add("what is the difference between a list and a tuple in python")
    assert not index.add("") and len(index.items) == 2


TASKS = ["Explain Python decorators with an example.", "", "Explain Python decorators with an example!",
         "How do I sort a dictionary by value?", "ok", "What does the walrus operator do?",
         "How do I reverse a linked list in Python?", "What is a context manager and when should I use one?"]


@pytest.fixture
def scripted(monkeypatch):
    """An endpoint whose task for attempt i is TASKS[i % 8] and whose answers echo the question."""
    calls = []

    def chat(base_url, model, messages, seed=0, **options):
        calls.append(seed)
        prompt = messages[-1]["content"]
        if prompt == "GIVE ME A TASK":
            return {"message": {"content": TASKS[seed % len(TASKS)]}}
        if prompt.startswith("Here is a conversation"):
            return {"message": {"content": "And what about performance?"}}
        return {"message": {"content": f"An answer to: {prompt}"}}

    monkeypatch.setattr(instructions, "chat", chat)
    monkeypatch.setattr(instructions, "first_model", lambda url: "scripted")
    return calls


def test_pipeline_filters_and_resumes(scripted, tmp_path):
    out = tmp_path / "gen.jsonl"
    plan = InstructionPlan("http://unused/v1", "GIVE ME A TASK", 3, out, multi_turn=0.5, concurrency=2)
    first = generate_instructions(plan)
    assert first.kept == 3 and first.attempts == 6  # attempts 1 and 4 are empty, 2 repeats 0
    assert first.rejected["empty"] == 2 and first.rejected["duplicate"] == 1
    plan.count = 5
    second = generate_instructions(plan)  # resumes: keeps the 3, continues from the saved attempt
    records = [json.loads(line) for line in out.read_text().splitlines()]
    tasks = [record["messages"][0]["content"] for record in records]
    assert second.kept == 5 and len(records) == 5 and len(set(tasks)) == 5
    assert "" not in tasks and "ok" not in tasks
    assert all(r["messages"][1]["content"] == f"An answer to: {r['messages'][0]['content']}" for r in records)
    assert any(len(r["messages"]) == 4 for r in records)  # some got a follow-up turn
    plan.count, plan.max_attempts = 100, 20
    assert generate_instructions(plan).attempts == 20  # attempts run out: no endless loop


def test_cli_against_tetra_serve_then_prepare(tmp_path, capsys):
    from tetra.data.tokenizer import TextTokenizer
    from tetra.model.io import load_model
    from tetra.serve.listen import BackgroundServer
    from tetra.serve.server import Server

    save_chat_tokenizer(tmp_path / "tokenizer", SAMPLE_TEXT)
    folder = save_tiny_base(tmp_path / "model", tmp_path / "tokenizer", max_positions=1024)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Write one question a Python programmer might ask.\n")
    out = tmp_path / "gen.jsonl"
    with BackgroundServer(Server(load_model(folder), TextTokenizer.load(folder), "tiny")) as url:
        assert main(["data", "generate", "--endpoint", url + "/v1", "--generator", str(prompt), "--count", "3",
                     "--out", str(out), "--max-tokens", "24"]) == 0
    assert "3 conversations" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 3
    assert main(["data", "prepare", str(out), "--format", "chat", "--tokenizer", str(folder), "--out",
                 str(tmp_path / "prepared"), "--val-fraction", "0"]) == 0
    assert main(["data", "generate", "--endpoint", "http://127.0.0.1:9/v1", "--generator", str(prompt), "--count",
                 "2", "--out", str(tmp_path / "x.jsonl"), "--model", "m"]) == 2
    assert "Cannot reach" in capsys.readouterr().err
