"""Refusal tokens: data preparation puts [respond] / [refuse...] in front of every reply and grows the vocabulary;
training (full or LoRA) grows the model to match and keeps the tokens through export; at inference, thresholds on
one forward pass decide which token to force, and sweeping them moves the refusal rate monotonically."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SAMPLE_TEXT
from tetra.cli import main
from tetra.data.refusal import refusal_table
from tetra.data.shards import PreparedData
from tetra.data.tokenizer import TextTokenizer
from tetra.infer.refusal import decide_refusals


def _records() -> list[dict]:
    answerable = [{"messages": [{"role": "user", "content": f"def add(a, b) number {i}?"},
                                {"role": "assistant", "content": "return a + b"}]} for i in range(12)]
    made_up = [{"messages": [{"role": "user", "content": f"import zorblax {i}?"},
                             {"role": "assistant", "content": "I do not know that module."}],
                "refusal_category": "unknown" if i % 2 else "fiction"} for i in range(12)]
    return [record for pair in zip(answerable, made_up, strict=True) for record in pair]


@pytest.fixture
def base(tmp_path):
    """A tiny untied Llama saved as a Hugging Face folder with a ChatML tokenizer."""
    from hf_factory import save_chat_tokenizer, save_tiny_base

    save_chat_tokenizer(tmp_path / "tokenizer", SAMPLE_TEXT, vocab_size=300)
    save_tiny_base(tmp_path / "base", tmp_path / "tokenizer")
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in _records()))
    return tmp_path


def _prepare(root, mode: str) -> PreparedData:
    assert main(["data", "prepare", str(root / "chats.jsonl"), "--format", "chat", "--tokenizer", str(root / "base"),
                 "--out", str(root / f"data-{mode}"), "--val-fraction", "0", "--refusal-tokens", mode]) == 0
    return PreparedData.open(root / f"data-{mode}")


@pytest.mark.parametrize(("mode", "tokens"), [("binary", ["[respond]", "[refuse]"]),
                                              ("categories", ["[respond]", "[refuse:fiction]", "[refuse:unknown]"])])
def test_preparation_marks_every_reply_and_grows_the_vocabulary(mode, tokens, base):
    data = _prepare(base, mode)
    tokenizer = TextTokenizer.load(data.tokenizer_folder)
    assert data.vocab_size == data.meta["base_vocab_size"] + len(tokens)
    assert [tokenizer.backend.id_to_token(i) for i in range(data.meta["base_vocab_size"], data.vocab_size)] == tokens
    split = data.split("train")
    starts = [0, *split.document_lengths().cumsum()[:-1].tolist()]
    for number, (start, length) in enumerate(zip(starts, split.document_lengths().tolist(), strict=True)):
        ids, mask = split.read(start, length).tolist(), split.read_mask(start, length).tolist()
        first_trained = ids[mask.index(True)]
        category = _records()[number].get("refusal_category")
        expected = "[respond]" if category is None else "[refuse]" if mode == "binary" else f"[refuse:{category}]"
        assert tokenizer.backend.id_to_token(first_trained) == expected  # the token is trained, first in the reply
    table = refusal_table(tokenizer)
    assert data.meta["refusal_tokens"] == table and table["respond"] == data.meta["base_vocab_size"]


def test_refusal_tokens_need_chat_data(base, capsys):
    assert main(["data", "prepare", str(base / "chats.jsonl"), "--tokenizer", str(base / "base"),
                 "--out", str(base / "x"), "--refusal-tokens", "binary"]) == 2
    assert "--format chat" in capsys.readouterr().err


def _train(root, mode: str, *extra: str) -> str:
    config = root / f"{mode}.toml"
    config.write_text(f'[init]\ncheckpoint = "{root / "base"}"\n[data]\npath = "{root / f"data-{mode}"}"\n'
                      'seq_len = 64\n[train]\nmax_steps = 8\nbatch_size = 4\nlr = 3e-2\nwarmup_steps = 1\n'
                      f'[eval]\nevery = 0\n[run]\ndir = "{root / f"run-{mode}"}"\nlog_every = 1\n')
    assert main(["train", str(config), "--no-progress", *extra]) == 0
    return str(root / f"run-{mode}" / "checkpoints" / "step-0000008")


def test_lora_training_grows_the_model_and_keeps_the_tokens_through_export(base, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft = pytest.importorskip("peft")
    from tetra.adapters.peft_io import load_model_with_adapter
    from tetra.model.io import load_model

    data = _prepare(base, "binary")
    checkpoint = _train(base, "binary", "lora.rank=4", "lora.targets=[\"q\",\"v\"]")
    adapter = json.loads((base / "run-binary" / "checkpoints" / "step-0000008" / "adapter_config.json").read_text())
    assert sorted(adapter["modules_to_save"]) == ["embed_tokens", "lm_head"]
    trained = load_model_with_adapter(checkpoint, merge=False)
    original = load_model(base / "base")
    old = original.config.vocab_size
    assert trained.config.vocab_size == data.vocab_size == old + 2
    assert torch.equal(trained.embed.weight[:old], original.embed.weight)  # the base rows never moved
    assert torch.equal(trained.head.weight[:old], original.head.weight)
    assert not torch.allclose(trained.embed.weight[old:], original.embed.weight.mean(0).expand(2, -1))
    # PEFT: resize the base as the tokenizer says, then load the adapter
    reference = AutoModelForCausalLM.from_pretrained(base / "base")
    reference.resize_token_embeddings(data.vocab_size)
    reference = peft.PeftModel.from_pretrained(reference, checkpoint).eval()
    ids = torch.randint(0, data.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = load_model_with_adapter(checkpoint)
        assert (merged(ids) - reference(ids).logits).abs().max().item() <= 1e-5
    assert main(["convert", "to-hf", checkpoint, str(base / "exported")]) == 0
    exported_tokenizer = AutoTokenizer.from_pretrained(base / "exported")
    assert exported_tokenizer.convert_tokens_to_ids("[refuse]") == old + 1
    exported = AutoModelForCausalLM.from_pretrained(base / "exported").eval()
    with torch.no_grad():
        assert (exported(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5
    assert "base_model.model.model.embed_tokens.weight" in load_file(f"{checkpoint}/adapter_model.safetensors")
    capsys.readouterr()


def test_thresholds_move_the_refusal_rate_monotonically(base, capsys):
    from tetra.adapters.peft_io import load_model_with_adapter

    _prepare(base, "categories")
    checkpoint = _train(base, "categories")
    model = load_model_with_adapter(checkpoint)
    tokenizer = TextTokenizer.load(checkpoint)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}]) for text in
               [f"def add(a, b) number {i}?" for i in range(6)] + [f"import zorblax {i}?" for i in range(6)]]
    default = decide_refusals(model, tokenizer, prompts)
    for decision in default:  # no threshold: refuse when some refusal token beats [respond]
        assert (decision.category is not None) == (max(decision.refuse_probabilities.values())
                                                   >= decision.respond_probability)
    rates = []
    for tau in (0.0, 0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0):
        decisions = decide_refusals(model, tokenizer, prompts, {"fiction": tau, "unknown": tau})
        rates.append(sum(d.category is not None for d in decisions) / len(decisions))
    assert rates[0] == 1.0 and rates == sorted(rates, reverse=True) and rates[-1] < 1.0
    suppressed = decide_refusals(model, tokenizer, prompts, {"fiction": 1.0, "unknown": 0.0})
    assert all(d.category == "unknown" for d in suppressed)  # enforced one category, suppressed the other
    capsys.readouterr()
    assert main(["generate", checkpoint, "--chat", "--prompt", "import zorblax 1?", "--refusal", "unknown=0",
                 "--max-new-tokens", "3", "--temperature", "0", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["completions"]
    assert row["refusal"]["category"] == "unknown" and 0 <= row["refusal"]["refuse_probabilities"]["unknown"] <= 1


def test_bad_thresholds_and_models_without_refusal_tokens(base, capsys):
    _prepare(base, "binary")
    checkpoint = _train(base, "binary")
    capsys.readouterr()
    for flags, expected in ((["--refusal-threshold", "1.5"], "[0, 1]"), (["--refusal", "refuse=-0.1"], "[0, 1]"),
                            (["--refusal", "violence=0.5"], "categories are refuse"),
                            (["--refusal", "refuse"], "CATEGORY=TAU")):
        assert main(["generate", checkpoint, "--prompt", "x", "--max-new-tokens", "1", *flags]) == 2
        message = capsys.readouterr().err
        assert expected in message and "Traceback" not in message
    assert main(["generate", str(base / "base"), "--prompt", "x", "--refusal-threshold", "0.5"]) == 2
    assert "no refusal tokens" in capsys.readouterr().err


def test_empty_replies_are_skipped_before_marking(base):
    records = _records()[:4] + [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}],
                                 "refusal_category": "fiction"}]
    (base / "chats.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    data = _prepare(base, "binary")
    assert data.meta["records"]["empty"] == 1 and data.meta["records"]["kept"] == 4


def test_added_tokens_in_a_padded_table_start_at_the_mean(base):
    """A model whose embedding table has spare rows past its tokenizer (as Qwen2's does) needs no growth; the
    refusal tokens' rows still start at the mean of the real rows, and train."""
    from tetra.model import ModelConfig, Transformer
    from tetra.model.io import save_model

    tokenizer = TextTokenizer.load(base / "tokenizer")
    torch.manual_seed(0)
    padded = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size + 16, hidden_size=32, n_layers=2, n_heads=4,
                                     max_position_embeddings=128, eos_token_id=tokenizer.eos_id))
    padded.init_weights(0.1)
    save_model(padded, base / "padded", tokenizer_from=base / "tokenizer")
    data = _prepare(base, "binary")
    first = data.meta["base_vocab_size"]
    from tetra.config import load_run_config
    from tetra.train.loop import build_loop

    config, explicit = load_run_config(None, [f"init.checkpoint={base / 'padded'}", f"data.path={data.folder}",
                                              "data.seq_len=64", "lora.rank=2", f"run.dir={base / 'probe'}"])
    loop, _ = build_loop(config, explicit)
    model = loop.model
    assert model.config.vocab_size == tokenizer.vocab_size + 16 and model.added_token_rows == (first, first + 2)
    expected = padded.embed.weight[:first].mean(0)
    assert torch.allclose(model.embed.weight[first:first + 2], expected.expand(2, -1), atol=1e-6)
    assert model.embed.weight.requires_grad
