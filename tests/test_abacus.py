"""Abacus positions and arithmetic tasks: digit places on hand-written strings (several numbers, reversed, packed
documents, a run continued from a cache), the training offset, cached decoding equal to a full recompute, task
generators deterministic by seed, exact scoring, and bad settings named with the fix."""

from __future__ import annotations

import json

import pytest
import torch

from tetra.cli import main
from tetra.data.arithmetic import ArithmeticTask, character_tokenizer, digit_token_ids, write_arithmetic_data
from tetra.errors import ConfigError, DataError
from tetra.eval.arithmetic import evaluate_arithmetic, parse_digit_range
from tetra.model import ModelConfig, Transformer
from tetra.model.abacus import digit_positions
from tetra.model.kv_cache import KVCache

TOKENIZER = character_tokenizer(ArithmeticTask())
DIGITS = torch.tensor(digit_token_ids(TOKENIZER))


def _ids(text: str) -> torch.Tensor:
    return torch.tensor([TOKENIZER.encode(text, add_special_tokens=False)])


def _places(text: str, **kwargs) -> list[int]:
    return digit_positions(_ids(text), DIGITS, **kwargs)[0].tolist()


def test_digit_places_on_hand_written_strings():
    assert _places("321+54=861") == [1, 2, 3, 0, 1, 2, 0, 1, 2, 3]
    assert _places("7,10,2:") == [1, 0, 1, 2, 0, 1, 0]
    assert _places("+=0") == [0, 0, 1]
    assert _places("5") == [1]


def test_a_packed_document_starts_a_new_run_and_a_cache_continues_one():
    ids = _ids("1234")
    documents = torch.tensor([[0, 0, 1, 1]])
    assert digit_positions(ids, DIGITS, document_ids=documents)[0].tolist() == [1, 2, 1, 2]
    assert digit_positions(_ids("56+7"), DIGITS, previous_run=torch.tensor([3]))[0].tolist() == [4, 5, 0, 1]
    assert digit_positions(_ids("+56"), DIGITS, previous_run=torch.tensor([3]))[0].tolist() == [0, 1, 2]


def _model(positions: str = "abacus", max_offset: int = 5) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=TOKENIZER.vocab_size, hidden_size=32, n_layers=2, n_heads=4,
                         positions=positions, abacus_digit_ids=DIGITS.tolist(), abacus_max_digits=12,
                         abacus_max_offset=max_offset, eos_token_id=TOKENIZER.eos_id, pad_token_id=TOKENIZER.pad_id)
    model = Transformer(config)
    model.init_weights(0.2)
    return model


def test_training_adds_one_offset_to_every_digit_place_and_evaluation_none():
    model = _model()
    ids = _ids("321+54=")
    places = digit_positions(ids, DIGITS)
    model.eval()
    assert torch.equal(model.abacus(places), model.abacus.table.weight[places])
    model.train()
    seen = set()
    for _ in range(40):
        rows = model.abacus(places)[0]
        matches = [int((model.abacus.table.weight - row).abs().sum(-1).argmin()) for row in rows]
        offset = matches[0] - 1
        assert matches == [p + offset if p else 0 for p in places[0].tolist()]
        seen.add(offset)
    assert seen == set(range(6))  # k ~ U{0..5}, every value drawn


@pytest.mark.parametrize("positions", ["abacus", "abacus+rope", "none"])
def test_cached_decoding_equals_a_full_recompute(positions):
    model = _model(positions).eval()
    ids = _ids("98765+4321=53086")
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 1, ids.shape[1], torch.float32, "cpu")
        pieces = [model(ids[:, :7], kv_cache=cache)]  # the prefill ends inside the second number
        for position in range(7, ids.shape[1]):
            pieces.append(model(ids[:, position:position + 1], kv_cache=cache, cache_start=position))
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_the_serving_engine_continues_digit_runs_like_generate():
    """Right-padded prompts prefilled together, then decoded in one batch at per-row positions (with a request
    joining later): each row's digit places continue from its own prompt, as `generate` gives it alone."""
    from test_engine import _run
    from tetra.infer.engine import Engine, GenerationRequest
    from tetra.infer.generate import generate_ids

    model = _model().eval()
    with torch.no_grad():  # digits only from here on: rows w and -w for digit pairs, 0 for every other token
        weight = model.head.weight
        directions = weight[DIGITS[:5]].clone()
        weight.zero_()
        weight[DIGITS[:5]], weight[DIGITS[5:]] = directions, -directions
    prompts = [_ids(text)[0].tolist() for text in ("98765+43", "1+2=", "55555", "3*")]
    expected = [generate_ids(model, [prompt], 6) for prompt in prompts]
    for stagger in (0, 2):
        sinks = _run(Engine(model, max_batch_size=4), [GenerationRequest(p, 6) for p in prompts], stagger)
        assert [[sink.tokens] for sink in sinks] == expected, stagger


def test_a_number_longer_than_the_table_is_named():
    model = _model(max_offset=0).eval()
    with pytest.raises(ValueError, match="abacus_max_digits"):
        model(_ids("1" * 14))


def test_tasks_write_known_answers_and_data_is_deterministic(tmp_path):
    assert ArithmeticTask("add").prompt([123, 45]) == "321+54="
    assert ArithmeticTask("add").answer([123, 45]) == "861"
    assert ArithmeticTask("mul", reverse=False).answer([12, 34]) == "408"
    assert ArithmeticTask("sort", reverse=False, count=3).answer([30, 4, 12]) == "4,12,30"
    for name in ("a", "b"):
        write_arithmetic_data(tmp_path / name, ArithmeticTask("add"), 6, 300, seed=3)
    for file in ("train-00000.bin", "train-mask-00000.bin", "meta.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["arithmetic"]["longest_number"] == 7 and meta["loss_mask"]


def test_the_scorer_is_exact(monkeypatch):
    """Answers right below 4 digits and one digit off from 4 on score 100% and 0%."""
    from tetra.eval import arithmetic

    task = ArithmeticTask("add")

    def answers(model, prompts, max_new_tokens, **kwargs):
        outputs = []
        for prompt in prompts:
            a, b = TOKENIZER.decode(prompt).rstrip("=").split("+")
            answer = task.answer([int(a[::-1]), int(b[::-1])])
            if max(len(a), len(b)) >= 4:
                answer = ("1" if answer[0] != "1" else "2") + answer[1:]
            outputs.append(TOKENIZER.encode(answer, add_special_tokens=False) + [TOKENIZER.eos_id])
        return outputs

    monkeypatch.setattr(arithmetic, "generate_ids", answers)
    result = evaluate_arithmetic(_model(), TOKENIZER, task, [1, 2, 3, 4, 5], samples=6)
    assert result.by_length() == {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 0.0}
    assert result.total[2, 5] == 6 and result.accuracy(3, 3) == 1.0


def test_bad_settings_are_named(tmp_path, capsys):
    from tetra.data.tokenizer import train_bpe

    merged = train_bpe(["9876543210 " * 200, "3210 987 " * 200], vocab_size=300)
    with pytest.raises(DataError, match="each digit"):
        digit_token_ids(merged)
    with pytest.raises(ConfigError, match="abacus_digit_ids"):
        ModelConfig(vocab_size=20, positions="abacus", abacus_max_digits=5).validate()
    with pytest.raises(ConfigError, match="range like 1-40"):
        parse_digit_range("ten")
    assert parse_digit_range("1-10", 4) == [1, 5, 9, 10]
    assert main(["data", "arithmetic", "--op", "add", "--max-digits", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--max-digits" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_data_train_and_eval_from_the_command_line(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["data", "arithmetic", "--max-digits", "3", "--examples", "400", "--out", str(data)]) == 0
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\npath = "{data}"\nseq_len = 32\n[model]\nhidden_size = 32\nn_layers = 1\n'
                      'n_heads = 2\npositions = "abacus"\n[train]\nmax_steps = 2\nbatch_size = 4\nwarmup_steps = 1\n'
                      f'[eval]\nevery = 0\n[run]\ndir = "{run}"\n')
    assert main(["train", str(config), "--no-progress"]) == 0
    checkpoint = run / "checkpoints" / "step-0000002"
    saved = json.loads((checkpoint / "model_config.json").read_text())
    assert saved["positions"] == "abacus" and saved["abacus_max_digits"] == 4 and len(saved["abacus_digit_ids"]) == 10
    capsys.readouterr()
    assert main(["eval", "arithmetic", str(checkpoint), "--digits", "1-4", "--samples", "2", "--out",
                 str(tmp_path / "heat.png")]) == 0
    assert "| 4 |" in capsys.readouterr().out
    assert (tmp_path / "heat.png").stat().st_size > 1000
    cells = json.loads((tmp_path / "heat.json").read_text())["cells"]
    assert len(cells) == 16 and all(cell["total"] == 2 for cell in cells)
    assert main(["convert", "to-hf", str(checkpoint), str(tmp_path / "hf")]) == 2
    assert "no Hugging Face architecture" in capsys.readouterr().err and not (tmp_path / "hf").exists()
