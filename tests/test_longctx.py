"""Generated long-context tasks: deterministic by seed, sized to the asked length, answers really in the context and
scored right; `tetra eval longctx`, `tetra loki calibrate` and `tetra generate --attention` on a tiny model; a model
whose context is too short for a length is refused."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from tetra.cli import main
from tetra.data.tokenizer import TextTokenizer
from tetra.errors import ConfigError
from tetra.eval.longctx.samples import make_samples, parse_lengths
from tetra.eval.longctx.tasks import TASKS, score_all, score_any


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint) -> TextTokenizer:
    return TextTokenizer.load(tiny_checkpoint)


def test_samples_are_deterministic_by_seed_and_sized_to_the_length(tokenizer):
    first = make_samples(tokenizer, list(TASKS), [1024, 1536], 2, seed=7)
    assert first == make_samples(tokenizer, list(TASKS), [1024, 1536], 2, seed=7)
    other = make_samples(tokenizer, list(TASKS), [1024, 1536], 2, seed=8)
    assert [s.prompt_ids for s in first] != [s.prompt_ids for s in other]
    for sample in first:
        total = len(sample.prompt_ids) + sample.max_new_tokens
        assert 0.85 * sample.length <= total <= sample.length, (sample.task, total)


@pytest.mark.parametrize("name", list(TASKS))
def test_the_answers_are_in_the_context_and_score_one(name):
    rendered = TASKS[name].render(random.Random(3), 60)
    task = TASKS[name]
    for answer in rendered.answers[:1] if task.score is score_any else rendered.answers:
        assert answer in rendered.context
    assert task.score(" and ".join(rendered.answers), rendered.answers) == 1.0
    assert task.score("I do not know.", rendered.answers) == 0.0


def test_common_words_are_the_most_frequent_and_partial_lists_score_partially():
    rendered = TASKS["common_words"].render(random.Random(0), 200)
    listing = re.findall(r"\d+\. (\w+)", rendered.context)
    assert {word for word, _ in Counter(listing).most_common(10)} == set(rendered.answers)
    assert score_all(" ".join(rendered.answers[:5]), rendered.answers) == 0.5
    values = TASKS["needle_multivalue"].render(random.Random(0), 40).answers
    assert score_all(f"{values[0]}, {values[2]}", values) == 0.5


def test_variable_tracking_chain_leads_to_the_value():
    rendered = TASKS["variable_tracking"].render(random.Random(5), 50)
    value = re.search(r"the value (\d+)", rendered.question).group(1)
    bindings = dict(re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", rendered.context))
    resolved = set()
    for name in bindings:
        target = name
        while target in bindings:
            target = bindings[target]
        if target == value:
            resolved.add(name)
    assert resolved == set(rendered.answers)


def test_lengths_parse_and_bad_ones_are_named():
    assert parse_lengths("1k,2k, 4096") == [1024, 2048, 4096]
    with pytest.raises(ConfigError, match="not a length"):
        parse_lengths("1k,two")
    with pytest.raises(ConfigError, match="Unknown long-context task"):
        make_samples(None, ["needle", "haystack"], [1024], 1, 0)


def test_eval_longctx_cli_writes_table_and_heatmap(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "lc"
    argv = ["eval", "longctx", str(tiny_checkpoint), "--lengths", "384,512", "--per-task", "1", "--tasks",
            "needle,qa", "--attention", "topk,h2o,topk-index", "--budget", "0.1,0.5", "--recent", "16",
            "--prefill-chunk", "128", "--out", str(out), "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"dense", "topk (budget 10% + 16 recent)", "topk (budget 50% + 16 recent)",
                            "h2o (budget 10% + 16 recent)", "h2o (budget 50% + 16 recent)",
                            "topk-index (budget 10% + 16 recent, flat index)",
                            "topk-index (budget 50% + 16 recent, flat index)"}
    assert set(summary["dense"]) == {"needle", "qa", "all"} and set(summary["dense"]["qa"]) == {"384", "512"}
    assert (out / "heatmap.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 7
    assert main(argv) == 2  # results already there are not overwritten
    assert "--overwrite" in capsys.readouterr().err


def test_a_length_past_the_models_context_is_refused(tiny_checkpoint, capsys):
    capsys.readouterr()
    assert main(["eval", "longctx", str(tiny_checkpoint), "--lengths", "1k,4k", "--tasks", "needle"]) == 2
    err = capsys.readouterr().err
    assert "context is 2048 tokens" in err and "4096" in err and "Traceback" not in err


def test_loki_calibrate_then_decode_with_it(tiny_checkpoint, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    loki = tmp_path / "keys.loki.safetensors"
    capsys.readouterr()
    assert main(["loki", "calibrate", str(tiny_checkpoint), "--data", str(text), "--length", "128", "--samples", "3",
                 "--out", str(loki), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["keys"] == "post-rotary" and report["tokens"] > 128 and len(report["explained_per_layer"]) == 2
    prompt = "def add(a, b): " * 20
    assert main(["generate", str(tiny_checkpoint), "--prompt", prompt, "--max-new-tokens", "5", "--temperature", "0",
                 "--attention", "loki", "--loki", str(loki), "--budget", "0.2", "--recent", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completions"][0]["tokens"] == 5
    assert main(["generate", str(tiny_checkpoint), "--prompt", prompt, "--attention", "loki"]) == 2
    assert "tetra loki calibrate" in capsys.readouterr().err


@pytest.mark.parametrize("options,phrase", [
    (["--attention", "topk", "--budget", "0"], "--budget must be > 0"),
    (["--kv-device", "tpu9"], "not a device name"),
    (["--prefill-chunk", "-4"], "--prefill-chunk must be >= 0"),
    (["--attention", "topk", "--recent", "0"], "--recent must be at least 1"),
])
def test_bad_long_context_options_are_named(tiny_checkpoint, capsys, options, phrase):
    capsys.readouterr()
    assert main(["generate", str(tiny_checkpoint), "--prompt", "def", "--max-new-tokens", "2", *options]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err
