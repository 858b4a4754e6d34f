"""`tetra data prepare`: tokenize documents into shards with EOS after each (or conversations with a loss mask,
prepare_chat.py), and hold out a validation split.

Entry point: prepare_data(source, tokenizer_folder, out, ...) -> the written meta.json as a dict.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tetra.data.gguf_tokenizer import load_tokenizer
from tetra.data.prepare_chat import ChatOptions, prepare_chat_data
from tetra.data.refusal import refusal_table
from tetra.data.shards import FORMAT_VERSION, META, ShardWriter, token_dtype
from tetra.data.sources import iter_documents, iter_records
from tetra.data.tokenizer import TextTokenizer
from tetra.errors import DataError
from tetra.files import atomic_directory, write_json
from tetra.integrity import write_manifest

BATCH_DOCUMENTS = 256


def is_validation(index: int, fraction: float) -> bool:
    """Evenly spaced hold-out: document i is validation when floor((i+1)f) > floor(i f). Streaming and exact."""
    return fraction > 0 and int((index + 1) * fraction) > int(index * fraction)


def _batches(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(documents)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _write_text(source: str, text_field: str, tokenizer: TextTokenizer, writers: dict[str, ShardWriter],
                val_fraction: float, advance: Callable[[int], None]) -> int:
    """Plain documents, each followed by EOS; returns how many were written."""
    eos = np.asarray([tokenizer.eos_id], dtype=np.int64)
    index = 0
    for batch in _batches(iter_documents(source, text_field), BATCH_DOCUMENTS):
        for ids in tokenizer.encode_batch(batch):
            tokens = np.concatenate([np.asarray(ids, dtype=np.int64), eos])
            writers["val" if is_validation(index, val_fraction) else "train"].add(tokens)
            index += 1
        advance(len(batch))
    return index


def prepare_data(source: str, tokenizer_folder: str | Path, out: str | Path, text_field: str = "text",
                 val_fraction: float = 0.01, shard_tokens: int = 2**27, overwrite: bool = False,
                 show_progress: bool = True, chat: ChatOptions | None = None) -> dict[str, Any]:
    """Tokenize every document of `source` (or, with `chat`, every conversation, with its loss mask); the same
    inputs always give byte-identical files."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1) (got {val_fraction}).")
    tokenizer = load_tokenizer(tokenizer_folder)
    base = {"base_tokenizer_fingerprint": tokenizer.fingerprint(), "base_vocab_size": tokenizer.vocab_size}
    if chat is not None and chat.refusal is not None:
        chat.refusal.scan(record for _, record in iter_records(source))
        tokenizer = chat.refusal.extend(tokenizer)
    if tokenizer.eos_id is None:
        raise DataError(f"The tokenizer in {tokenizer_folder} has no eos_token; documents need one between them. "
                        "Set eos_token in its tokenizer_config.json.")
    dtype = token_dtype(tokenizer.vocab_size)
    records: dict[str, Any] | None = None
    with atomic_directory(out, overwrite) as staging:
        writers = {split: ShardWriter(staging, split, dtype, shard_tokens, with_mask=chat is not None)
                   for split in ("train", "val")}
        with Progress(TextColumn("tokenizing"), BarColumn(), MofNCompleteColumn(), TextColumn("documents"),
                      TimeElapsedColumn(), disable=not show_progress, transient=True) as progress:
            task = progress.add_task("tokenize", total=None)
            advance = lambda count: progress.advance(task, count)  # noqa: E731
            if chat is None:
                index = _write_text(source, text_field, tokenizer, writers, val_fraction, advance)
            else:
                records = prepare_chat_data(source, tokenizer, writers, lambda i: is_validation(i, val_fraction),
                                            chat, advance)
                index = records["kept"]
        splits = {split: writer.finish() for split, writer in writers.items()}
        if splits["train"]["tokens"] == 0:
            raise DataError(f"{source!r} produced no training tokens (empty documents, or every document went "
                            "to validation). Check the source and --val-fraction.")
        if val_fraction > 0 and splits["val"]["documents"] == 0:
            raise DataError(f"{source!r} has only {index} documents: too few for --val-fraction {val_fraction} to "
                            "hold out even one. Raise --val-fraction, or pass --val-fraction 0 (no evaluation).")
        tokenizer.save(staging / "tokenizer")
        meta = {"format_version": FORMAT_VERSION, "source": source, "dtype": dtype.name,
                "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                "tokenizer_fingerprint": tokenizer.fingerprint(), "val_fraction": val_fraction,
                "documents": index, "splits": splits, "format": "text" if chat is None else chat.format,
                "loss_mask": chat is not None}
        if chat is not None:
            meta.update(train_on=chat.train_on, max_length=chat.max_length, too_long=chat.too_long,
                        pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id,
                        records=records, refusal_tokens=refusal_table(tokenizer), **base)
        write_json(staging / META, meta)
        write_manifest(staging)  # sizes checked at every open, hashes by `tetra data verify`
    return meta


def copy_tokenizer(dataset_folder: Path, destination: Path) -> None:
    """Put a dataset's tokenizer files next to a checkpoint, so the checkpoint is self-contained."""
    for path in (dataset_folder / "tokenizer").iterdir():
        shutil.copy2(path, destination / path.name)
