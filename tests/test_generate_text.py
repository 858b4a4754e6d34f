"""Text generation: streaming pieces add up to the result, stop strings cut the text, and the CLI prints it."""

from __future__ import annotations

import json

from tetra.cli import main
from tetra.data.tokenizer import TextTokenizer
from tetra.infer.sampling import SamplingConfig
from tetra.infer.text import generate_text
from tetra.model.io import load_model

GREEDY = SamplingConfig(temperature=0.0)


def test_streamed_pieces_add_up_to_the_completion(tiny_checkpoint):
    model, tokenizer = load_model(tiny_checkpoint), TextTokenizer.load(tiny_checkpoint)
    pieces: dict[int, list[str]] = {0: [], 1: []}
    completions = generate_text(model, tokenizer, ["def add(", "The quick"], 30, GREEDY,
                                on_text=lambda row, piece: pieces[row].append(piece))
    for row, completion in enumerate(completions):
        assert "".join(pieces[row]) == completion.text
        assert completion.finish_reason in ("length", "eos")
        assert len(completion.token_ids) <= 30


def test_stop_string_cuts_the_text_and_stops_early(tiny_checkpoint):
    model, tokenizer = load_model(tiny_checkpoint), TextTokenizer.load(tiny_checkpoint)
    free = generate_text(model, tokenizer, ["import "], 40, GREEDY)[0]
    assert len(free.text) > 6, free.text
    stop = free.text[3:6]
    streamed: list[str] = []
    stopped = generate_text(model, tokenizer, ["import "], 40, GREEDY, stop_strings=[stop],
                            on_text=lambda row, piece: streamed.append(piece))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert "".join(streamed) == stopped.text
    assert len(stopped.token_ids) < len(free.token_ids)


def test_generate_command_streams_and_reports_json(tiny_checkpoint, capsys):
    assert main(["generate", str(tiny_checkpoint), "--prompt", "def add(", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    streamed = capsys.readouterr()
    assert streamed.out.startswith("def add(") and "tokens/s" in streamed.err
    assert main(["generate", str(tiny_checkpoint), "--prompt", "def add(", "--prompt", "import", "--seed", "1",
                 "--max-new-tokens", "12", "--top-k", "20", "--top-p", "0.9", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [c["prompt"] for c in result["completions"]] == ["def add(", "import"]
    assert all(1 <= c["tokens"] <= 12 for c in result["completions"])
    assert result["tokens_per_s"] > 0
