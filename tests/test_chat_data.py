"""Chat data: records of three formats rendered with the tokenizer's chat template, loss masks on the assistant
tokens, bad records named or counted, `tetra data inspect`, and packing that trains each document as if alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE_TEXT
from hf_factory import save_chat_tokenizer
from tetra.cli import main
from tetra.data.batch import IGNORE_INDEX
from tetra.data.chat import ChatEncoder
from tetra.data.packing import DocumentBatches, pack_documents
from tetra.data.shards import PreparedData
from tetra.data.tokenizer import TextTokenizer, train_bpe
from tetra.model import ModelConfig, Transformer
from tetra.train.losses import per_token_loss

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b)?"},
                {"role": "assistant", "content": "return a + b"}, {"role": "user", "content": "and import os?"},
                {"role": "assistant", "content": "print(name)"}]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory) -> Path:
    return save_chat_tokenizer(tmp_path_factory.mktemp("chat-tokenizer"), SAMPLE_TEXT)


def _trained_text(tokenizer: TextTokenizer, encoded) -> list[str]:
    """The trained tokens, decoded run by run."""
    runs, current = [], []
    for token, trained in zip(encoded.tokens.tolist(), encoded.mask.tolist(), strict=True):
        if trained:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    if current:
        runs.append(tokenizer.decode(current, skip_special_tokens=False))
    return runs


def test_assistant_mask_covers_replies_and_their_end_of_turn(chat_tokenizer):
    tokenizer = TextTokenizer.load(chat_tokenizer)
    encoded = ChatEncoder(tokenizer).encode(CONVERSATION)
    assert _trained_text(tokenizer, encoded) == ["return a + b<|im_end|>\n", "print(name)<|im_end|>\n"]
    assert tokenizer.decode(encoded.tokens.tolist(), skip_special_tokens=False) == \
        tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    last = ChatEncoder(tokenizer, "last-assistant").encode(CONVERSATION)
    assert _trained_text(tokenizer, last) == ["print(name)<|im_end|>\n"]
    assert ChatEncoder(tokenizer, "all").encode(CONVERSATION).mask.all()


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))
    return path


def _prepare(tmp_path, tokenizer, source, *extra) -> dict:
    out = tmp_path / "data"
    assert main(["data", "prepare", str(source), "--tokenizer", str(tokenizer), "--out", str(out),
                 "--val-fraction", "0", *extra]) == 0
    return json.loads((out / "meta.json").read_text())


def test_alpaca_and_sharegpt_equal_the_same_chat(chat_tokenizer, tmp_path):
    chat = {"messages": [{"role": "user", "content": "def add(a, b)?\n\nin python"},
                         {"role": "assistant", "content": "return a + b"}]}
    alpaca = {"instruction": "def add(a, b)?", "input": "in python", "output": "return a + b"}
    sharegpt = {"conversations": [{"from": "human", "value": "def add(a, b)?\n\nin python"},
                                  {"from": "gpt", "value": "return a + b"}]}
    stored = []
    for name, record in (("chat", chat), ("alpaca", alpaca), ("sharegpt", sharegpt)):
        folder = tmp_path / name
        folder.mkdir()
        _prepare(folder, chat_tokenizer, _write_jsonl(folder / "in.jsonl", [record]), "--format", name)
        split = PreparedData.open(folder / "data").split("train")
        stored.append((split.read(0, split.total).tolist(), split.read_mask(0, split.total).tolist()))
    assert stored[0] == stored[1] == stored[2]
    assert any(stored[0][1]) and not all(stored[0][1])


def test_bad_records_are_named_or_counted(chat_tokenizer, tmp_path, capsys):
    good = {"messages": CONVERSATION}
    source = _write_jsonl(tmp_path / "in.jsonl", [good, {"messages": [{"role": "wizard", "content": "x"}]},
                                                  "{not json", {"messages": [{"role": "user", "content": "q"}]},
                                                  good])
    assert main(["data", "prepare", str(source), "--format", "chat", "--tokenizer", str(chat_tokenizer),
                 "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "line 2" in message and "'wizard'" in message and "system, user, assistant" in message
    assert "--skip-bad-records" in message and not (tmp_path / "out").exists()
    meta = _prepare(tmp_path, chat_tokenizer, source, "--format", "chat", "--skip-bad-records")
    assert meta["records"] | {"trained_tokens": 0} == {"records": 5, "kept": 2, "malformed": 2, "empty": 1,
                                                       "too_long_dropped": 0, "truncated": 0, "trained_tokens": 0}
    assert meta["loss_mask"] and meta["format"] == "chat"


def test_too_long_conversations_are_dropped_or_truncated(chat_tokenizer, tmp_path):
    tokenizer = TextTokenizer.load(chat_tokenizer)
    length = len(ChatEncoder(tokenizer).encode(CONVERSATION).tokens)
    short = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    source = _write_jsonl(tmp_path / "in.jsonl", [{"messages": CONVERSATION}, {"messages": short}])
    dropped = _prepare(tmp_path, chat_tokenizer, source, "--format", "chat", "--max-length", str(length - 3))
    assert dropped["records"]["too_long_dropped"] == 1 and dropped["records"]["kept"] == 1
    cut = _prepare(tmp_path, chat_tokenizer, source, "--format", "chat", "--max-length", str(length - 3),
                   "--too-long", "truncate", "--overwrite")
    assert cut["records"]["truncated"] == 1 and cut["records"]["kept"] == 2
    assert cut["splits"]["train"]["tokens"] == length - 3 + len(ChatEncoder(tokenizer).encode(short).tokens)


def test_tokenizer_without_template_says_what_still_works(tmp_path, capsys):
    train_bpe(SAMPLE_TEXT, vocab_size=300).save(tmp_path / "plain")
    source = _write_jsonl(tmp_path / "in.jsonl", [{"messages": CONVERSATION}])
    assert main(["data", "prepare", str(source), "--format", "alpaca", "--tokenizer", str(tmp_path / "plain"),
                 "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "no chat template" in message and "--format text" in message


def test_inspect_shows_tokens_beside_the_mask(chat_tokenizer, tmp_path, capsys):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"messages": CONVERSATION}] * 2)
    _prepare(tmp_path, chat_tokenizer, source, "--format", "chat")
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "data"), "--records", "1", "--json"]) == 0
    [record] = json.loads(capsys.readouterr().out)
    trained = "".join(piece for piece, flag in zip(record["tokens"], record["trained"], strict=True) if flag)
    assert trained == "return a + b<|im_end|>\nprint(name)<|im_end|>\n"
    assert main(["data", "inspect", str(tmp_path / "data"), "--records", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(f"{len(record['ids'])} tokens, {sum(record['trained'])} trained")
    assert any(line.startswith("1 ") for line in lines) and any(line.startswith(". ") for line in lines)


def test_packing_keeps_whole_documents_in_rows():
    lengths = np.asarray([5, 9, 3, 7, 2, 8, 4])
    rows = pack_documents(lengths, 10, seed=3)
    assert sorted(doc for row in rows for doc in row) == list(range(7))
    assert all(lengths[row].sum() <= 10 for row in rows)
    assert rows == pack_documents(lengths, 10, seed=3)


@pytest.mark.parametrize("positions", ["rope", "learned"])  # rotary attention alone cannot tell a shifted position
def test_packed_batch_equals_each_document_alone(positions, chat_tokenizer, tmp_path):
    """Per-token losses of packed rows equal those of each document run by itself (positions restart, attention
    stays inside the document), and no target crosses a boundary or falls on padding."""
    records = [{"messages": CONVERSATION[: 3 + 2 * (i % 2)]} for i in range(9)]
    records += [{"messages": [{"role": "user", "content": f"x = {i}"}, {"role": "assistant", "content": "ok"}]}
                for i in range(7)]
    _prepare(tmp_path, chat_tokenizer, _write_jsonl(tmp_path / "in.jsonl", records), "--format", "chat")
    data = PreparedData.open(tmp_path / "data")
    split = data.split("train")
    batches = DocumentBatches(split, seq_len=127, batch_size=2, seed=0, pad_id=data.meta["pad_id"])
    assert batches.num_sequences < 16  # documents really share rows
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=data.vocab_size, hidden_size=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, max_position_embeddings=128, positions=positions)).eval()
    lengths, starts = split.document_lengths(), np.cumsum([0, *split.document_lengths()[:-1]])
    checked = 0
    for position in range(batches.num_sequences // 2):
        batch = batches.batch(position)
        with torch.no_grad():
            packed = per_token_loss(model(batch.inputs, document_ids=batch.document_ids), batch.labels)
        for row in range(batch.tokens.shape[0]):
            for slot in batch.document_ids[row].unique().tolist():
                if slot < 0:
                    continue
                where = (batch.document_ids[row] == slot).nonzero().flatten()
                first, last = int(where[0]), int(where[-1]) + 1
                doc = batches.rows[int(batches._order(0)[position * 2 + row])][slot]
                alone = torch.from_numpy(split.read(int(starts[doc]), int(lengths[doc])).astype("int64"))[None]
                mask = torch.from_numpy(split.read_mask(int(starts[doc]), int(lengths[doc])))[None, 1:]
                with torch.no_grad():
                    expected = per_token_loss(model(alone[:, :-1]), alone[:, 1:].masked_fill(~mask, IGNORE_INDEX))
                # The packed row also predicts this document's first token from the one before: excluded.
                assert not bool(batch.loss_mask[row, first - 1]) if first > 0 else True
                got = packed[row, first: last - 1]
                assert torch.allclose(got, expected[0], atol=1e-5), (position, row, slot)
                assert torch.equal(batch.labels[row, first: last - 1] != IGNORE_INDEX, mask[0])
                checked += 1
        padding = batch.document_ids < 0
        assert not bool(batch.loss_mask[padding].any())
    assert checked >= 8



def test_fine_tuning_on_chat_data_end_to_end(chat_tokenizer, tmp_path):
    """tetra train from a checkpoint on chat data: document packing is chosen, validation counts only trained
    tokens, and the run resumes exactly."""
    from tetra.model.io import save_model
    from tetra.train.loop import build_loop

    tokenizer = TextTokenizer.load(chat_tokenizer)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, n_layers=2, n_heads=4,
                                    max_position_embeddings=128, eos_token_id=tokenizer.eos_id))
    model.init_weights()
    save_model(model, tmp_path / "base", tokenizer_from=chat_tokenizer)
    records = [{"messages": CONVERSATION[: 3 + 2 * (i % 2)]} for i in range(40)]
    source = _write_jsonl(tmp_path / "in.jsonl", records)
    assert main(["data", "prepare", str(source), "--format", "chat", "--tokenizer", str(chat_tokenizer),
                 "--out", str(tmp_path / "data"), "--val-fraction", "0.2"]) == 0
    overrides = [f"init.checkpoint={tmp_path / 'base'}", f"data.path={tmp_path / 'data'}", "data.seq_len=96",
                 "train.batch_size=2", "train.grad_accum=2", "train.max_steps=4", "train.warmup_steps=1",
                 "eval.every=2", "eval.batches=2", "run.log_every=1", "run.checkpoint_every=2"]
    config_file = tmp_path / "sft.toml"
    config_file.write_text("[train]\nlr = 1e-3\n")
    assert main(["train", str(config_file), *overrides, f"run.dir={tmp_path / 'run'}", "--no-progress"]) == 0
    from tetra.config import load_run_config

    config, explicit = load_run_config(config_file, overrides + [f"run.dir={tmp_path / 'probe'}"])
    loop, _ = build_loop(config, explicit)
    assert isinstance(loop.train_batches, DocumentBatches)
    assert loop.train_batches.batch(0).loss_mask.float().mean() < 0.6  # prompts are not trained
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in record for record in metrics)
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000004")
    assert main(["train", str(config_file), *overrides, f"run.dir={tmp_path / 'run'}", "--resume", "auto",
                 "--no-progress"]) == 0
    resumed = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed if r["step"] > 2] == [r["loss"] for r in metrics if r["step"] > 2]


def test_stream_packing_of_chat_data_is_refused(chat_tokenizer, tmp_path, capsys):
    from tetra.model.io import save_model

    tokenizer = TextTokenizer.load(chat_tokenizer)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, n_layers=1, n_heads=4))
    save_model(model, tmp_path / "base", tokenizer_from=chat_tokenizer)
    _prepare(tmp_path, chat_tokenizer, _write_jsonl(tmp_path / "in.jsonl", [{"messages": CONVERSATION}] * 4),
             "--format", "chat")
    (tmp_path / "c.toml").write_text("[train]\nmax_steps = 1\n")
    capsys.readouterr()
    assert main(["train", str(tmp_path / "c.toml"), f"init.checkpoint={tmp_path / 'base'}", "data.packing=stream",
                 f"data.path={tmp_path / 'data'}", "data.seq_len=64", "train.warmup_steps=0",
                 f"run.dir={tmp_path / 'run'}", "--no-progress"]) == 2
    assert "ignore the loss mask" in capsys.readouterr().err
