"""What a prepared dataset trains on: the first documents of a split as (token text, id, trained) triples.

Entry point: inspect_records(folder, count, split).
"""

from __future__ import annotations

from pathlib import Path

from tetra.data.shards import PreparedData
from tetra.data.tokenizer import TextTokenizer
from tetra.errors import DataError


def inspect_records(folder: str | Path, count: int, split: str = "train") -> list[list[tuple[str, int, bool]]]:
    """The first `count` documents of a split, token by token with the loss mask."""
    if count < 1:
        raise DataError(f"--records must be at least 1 (got {count}).")
    data = PreparedData.open(folder)
    tokens = data.split(split)
    tokenizer = TextTokenizer.load(data.tokenizer_folder)
    lengths = tokens.document_lengths()
    records, start = [], 0
    for length in lengths[:count]:
        ids = tokens.read(start, int(length)).tolist()
        mask = tokens.read_mask(start, int(length)).tolist()
        pieces = [tokenizer.decode([token], skip_special_tokens=False) for token in ids]
        records.append(list(zip(pieces, ids, mask, strict=True)))
        start += int(length)
    return records
