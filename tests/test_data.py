"""Data: byte-identical preparation, exact validation split, packed deterministic batches, rank split, bad data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tetra.data.loader import PackedBatches
from tetra.data.prepare import is_validation, prepare_data
from tetra.data.shards import PreparedData
from tetra.data.sources import iter_documents
from tetra.errors import DataError


def test_preparation_is_byte_identical(prepared_data, corpus_jsonl, tmp_path):
    again = prepare_data(str(corpus_jsonl), prepared_data / "tokenizer", tmp_path / "again", val_fraction=0.1,
                         show_progress=False)
    for path in sorted(prepared_data.rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (tmp_path / "again" / path.relative_to(prepared_data)).read_bytes(), path
    assert again["splits"]["val"]["documents"] == 12 and again["splits"]["train"]["documents"] == 108
    assert again["dtype"] == "uint16"


def test_documents_are_packed_with_eos_between_them(prepared_data, corpus_jsonl):
    from tetra.data.tokenizer import TextTokenizer

    data = PreparedData.open(prepared_data)
    tokenizer = TextTokenizer.load(data.tokenizer_folder)
    split = data.split("train")
    offsets = np.load(prepared_data / "train-documents.npy")
    documents = [d for i, d in enumerate(iter_documents(str(corpus_jsonl))) if not is_validation(i, 0.1)]
    for index in (0, 1, 50):
        end = offsets[index + 1]
        tokens = split.read(int(offsets[index]), int(end - offsets[index])).tolist()
        assert tokens == tokenizer.encode(documents[index]) + [data.eos_id]


def test_shards_split_and_stitch(corpus_jsonl, prepared_data, tmp_path):
    meta = prepare_data(str(corpus_jsonl), prepared_data / "tokenizer", tmp_path / "small", val_fraction=0.1,
                        shard_tokens=1000, show_progress=False)
    assert len(meta["splits"]["train"]["shards"]) > 3
    one = PreparedData.open(prepared_data).split("train")
    many = PreparedData.open(tmp_path / "small").split("train")
    assert np.array_equal(one.read(0, one.total), many.read(0, many.total))
    assert np.array_equal(one.read(990, 25), many.read(990, 25))


def test_loader_is_deterministic_and_resumable(prepared_data):
    split = PreparedData.open(prepared_data).split("train")
    first = PackedBatches(split, 32, 4, seed=1)
    same = PackedBatches(split, 32, 4, seed=1)
    other = PackedBatches(split, 32, 4, seed=2)
    positions = [0, 1, 7, 3 * first.num_sequences // 4 + 5]  # the last one is in the second epoch
    for position in positions:
        assert torch.equal(first.batch(position), same.batch(position))
    assert not torch.equal(first.batch(0), other.batch(0))
    assert first.batch(0).shape == (4, 33)


class IndexBatches(PackedBatches):
    """Returns which sequence each row is, instead of its tokens."""

    def sequence(self, index: int) -> np.ndarray:
        return np.asarray([index])


def test_one_epoch_covers_every_sequence_once(prepared_data):
    batches = IndexBatches(PreparedData.open(prepared_data).split("train"), 32, 1, seed=0)
    seen = [int(batches.batch(p)) for p in range(batches.num_sequences)]
    assert sorted(seen) == list(range(batches.num_sequences))
    assert seen != sorted(seen)  # shuffled


def test_ranks_take_disjoint_shares_of_the_global_batch(prepared_data):
    split = PreparedData.open(prepared_data).split("train")
    single = PackedBatches(split, 32, 8, seed=3)
    ranks = [PackedBatches(split, 32, 2, seed=3, rank=r, world_size=4) for r in range(4)]
    for position in (0, 5):
        assert torch.equal(torch.cat([rank.batch(position) for rank in ranks]), single.batch(position))


def test_truncated_shard_is_refused(prepared_data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared_data, copy)
    shard = copy / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or damaged"):
        PreparedData.open(copy).split("train")


def test_empty_and_missing_sources(prepared_data, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no training tokens"):
        prepare_data(str(tmp_path / "empty.jsonl"), prepared_data / "tokenizer", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="No documents found"):
        prepare_data(str(tmp_path / "missing"), prepared_data / "tokenizer", tmp_path / "out")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="no string field 'text'"):
        prepare_data(str(tmp_path / "bad.jsonl"), prepared_data / "tokenizer", tmp_path / "out")
    with pytest.raises(DataError, match="not a prepared dataset"):
        PreparedData.open(tmp_path)


def test_sources_read_txt_jsonl_parquet_folders_and_globs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "b.jsonl").write_text(json.dumps({"content": "from jsonl"}) + "\n\n" + json.dumps({"content": "two"}))
    pq.write_table(pa.table({"content": ["from parquet", None, "three"]}), tmp_path / "c.parquet")
    assert list(iter_documents(str(tmp_path / "b.jsonl"), "content")) == ["from jsonl", "two"]
    assert list(iter_documents(str(tmp_path / "c.parquet"), "content")) == ["from parquet", "three"]
    assert list(iter_documents(str(tmp_path / "*.parquet"), "content")) == ["from parquet", "three"]
    assert len(list(iter_documents(str(tmp_path), "content"))) == 5
    with pytest.raises(DataError, match="no column 'text'"):
        list(iter_documents(str(tmp_path / "c.parquet")))


def test_stdlib_corpus_is_present_without_download():
    from tetra.data.sources import stdlib_files

    files = stdlib_files()
    assert len(files) > 300 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
