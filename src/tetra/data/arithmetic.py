"""Arithmetic tasks for length generalization (the abacus paper's setting): addition, multiplication and sorting,
written with one token per character, numbers least-significant digit first where the paper does (--reverse), and
the loss on the answer only.

A problem is "a+b=" and its answer "c" (both reversed with --reverse), then the end-of-sequence token; sorting is
"n1,n2,...:" answered by the numbers in increasing order. The task (operation, reversal) is written into the
tokenizer's settings, so `tetra eval arithmetic` asks a trained checkpoint the same kind of question.

Entry points: character_tokenizer(), ArithmeticTask, digit_token_ids(tokenizer), write_arithmetic_data(...).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from tetra.data.shards import FORMAT_VERSION, META, ShardWriter, token_dtype
from tetra.data.tokenizer import TextTokenizer
from tetra.errors import DataError
from tetra.files import atomic_directory, write_json
from tetra.integrity import write_manifest

OPERATIONS = ("add", "mul", "sort")
SYMBOLS = "0123456789+*=,:>?"
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
TASK_KEY = "tetra_arithmetic"  # in tokenizer_config.json


def character_tokenizer(task: Any = None, key: str = TASK_KEY, symbols: str = SYMBOLS) -> TextTokenizer:
    """One token per character of the task's alphabet `symbols`; <pad> is id 0 and no digit. The task (a dataclass)
    is recorded under `key` in tokenizer_config.json."""
    vocab = {token: index for index, token in enumerate([PAD, EOS, UNK, *symbols])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([PAD, EOS, UNK])  # skipped when decoding answers
    extra = {key: asdict(task)} if task is not None else {}
    return TextTokenizer(backend, eos_token=EOS, pad_token=PAD, extra_config=extra)


def digit_token_ids(tokenizer: TextTokenizer) -> list[int]:
    """The ids of 0..9, checking each digit is one token and numbers split into single digits (abacus needs it)."""
    ids = []
    for digit in "0123456789":
        encoded = tokenizer.encode(digit, add_special_tokens=False)
        if len(encoded) != 1:
            raise DataError(f"The tokenizer encodes the digit {digit!r} as {len(encoded)} tokens; abacus positions "
                            "need each digit to be one token. Use a tokenizer that splits numbers into digits "
                            "(`tetra data arithmetic` writes one).")
        ids.append(encoded[0])
    number = tokenizer.encode("9876543210", add_special_tokens=False)
    if number != ids[::-1]:
        raise DataError("The tokenizer merges digits of a number into multi-digit tokens (\"9876543210\" became "
                        f"{len(number)} tokens); abacus positions count digits, so each digit must stay a token "
                        "of its own. Use a tokenizer that splits numbers into digits.")
    return ids


@dataclass
class ArithmeticTask:
    """What kind of problems, and how they are written."""

    op: str = "add"
    reverse: bool = True  # numbers least-significant digit first (prompt and answer)
    count: int = 3  # sort: numbers per list

    def check(self) -> None:
        if self.op not in OPERATIONS:
            raise DataError(f"--op {self.op!r} is unknown; choose one of {', '.join(OPERATIONS)}")
        if self.op == "sort" and self.count < 2:
            raise DataError(f"--count must be at least 2 for sorting (got {self.count})")

    def write(self, number: int) -> str:
        text = str(number)
        return text[::-1] if self.reverse else text

    def prompt(self, operands: list[int]) -> str:
        if self.op == "sort":
            return ",".join(self.write(value) for value in operands) + ":"
        symbol = "+" if self.op == "add" else "*"
        return f"{self.write(operands[0])}{symbol}{self.write(operands[1])}="

    def answer(self, operands: list[int]) -> str:
        if self.op == "sort":
            return ",".join(self.write(value) for value in sorted(operands))
        return self.write(operands[0] + operands[1] if self.op == "add" else operands[0] * operands[1])

    def operand_count(self) -> int:
        return self.count if self.op == "sort" else 2

    def longest_number(self, max_digits: int) -> int:
        """Digits of the longest number a prompt or answer can hold."""
        return {"add": max_digits + 1, "mul": 2 * max_digits, "sort": max_digits}[self.op]


def random_number(digits: int, rng: random.Random) -> int:
    """Uniform among numbers of exactly `digits` digits (0..9 for one digit)."""
    return rng.randrange(10) if digits == 1 else rng.randrange(10 ** (digits - 1), 10**digits)


def sample_operands(task: ArithmeticTask, lengths: tuple[int, ...], rng: random.Random) -> list[int]:
    return [random_number(length, rng) for length in lengths]


def write_arithmetic_data(out: str | Path, task: ArithmeticTask, max_digits: int, examples: int, seed: int = 0,
                          min_digits: int = 1, val_fraction: float = 0.01, overwrite: bool = False) -> dict[str, Any]:
    """A prepared-data folder (token shards with loss masks, meta.json, the tokenizer): `examples` problems with
    every operand's length drawn uniformly from min_digits..max_digits."""
    task.check()
    if not 1 <= min_digits <= max_digits:
        raise DataError(f"--min-digits and --max-digits must satisfy 1 <= min <= max (got {min_digits}, {max_digits})")
    rng = random.Random(seed)

    def problems() -> Iterator[tuple[str, str]]:
        for _ in range(examples):
            lengths = tuple(rng.randint(min_digits, max_digits) for _ in range(task.operand_count()))
            operands = sample_operands(task, lengths, rng)
            yield task.prompt(operands), task.answer(operands)

    settings = {**asdict(task), "min_digits": min_digits, "max_digits": max_digits, "seed": seed,
                "longest_number": task.longest_number(max_digits)}
    return write_problem_data(out, character_tokenizer(task), problems(), examples, f"arithmetic:{task.op}",
                              {"arithmetic": settings}, val_fraction, overwrite)


def write_problem_data(out: str | Path, tokenizer: TextTokenizer, problems: Iterable[tuple[str, str]], examples: int,
                       source: str, settings: dict[str, Any], val_fraction: float = 0.01,
                       overwrite: bool = False) -> dict[str, Any]:
    """(prompt, answer) problems as prepared data: the answer and the end token trained, the prompt not; every
    1 / val_fraction-th problem held out."""
    if examples <= 0 or not 0 <= val_fraction < 1:
        raise DataError(f"--examples must be positive and --val-fraction in [0, 1) (got {examples}, {val_fraction})")
    dtype = token_dtype(tokenizer.vocab_size)
    validation_every = round(1 / val_fraction) if val_fraction else 0
    with atomic_directory(out, overwrite) as staging:
        writers = {split: ShardWriter(staging, split, dtype, 2**27, with_mask=True) for split in ("train", "val")}
        trained_tokens = 0
        for index, (prompt_text, answer_text) in enumerate(problems):
            prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
            answer = tokenizer.encode(answer_text, add_special_tokens=False) + [tokenizer.eos_id]
            tokens = np.array(prompt + answer, dtype=dtype)
            mask = np.array([0] * len(prompt) + [1] * len(answer), dtype=np.uint8)
            split = "val" if validation_every and index % validation_every == validation_every - 1 else "train"
            writers[split].add(tokens, mask)
            trained_tokens += len(answer)
        splits = {split: writer.finish() for split, writer in writers.items()}
        tokenizer.save(staging / "tokenizer")
        meta = {"format_version": FORMAT_VERSION, "source": source, "dtype": dtype.name,
                "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                "tokenizer_fingerprint": tokenizer.fingerprint(), "val_fraction": val_fraction,
                "documents": examples, "splits": splits, "format": source.split(":")[0], "loss_mask": True,
                "pad_id": tokenizer.pad_id, "train_on": "answer", "trained_tokens": trained_tokens, **settings}
        write_json(staging / META, meta)
        write_manifest(staging)  # sizes checked at every open, hashes by `tetra data verify`
    return meta


def write_task_data(out: str | Path, task: Any, task_key: str, symbols: str, source: str, examples: int,
                    seed: int = 0, val_fraction: float = 0.01, overwrite: bool = False) -> dict[str, Any]:
    """Prepared data of `examples` questions from a multi-step task (its problem(rng) -> (prompt, answer, hops)),
    written with one token per character of `symbols`; the task and seed go into meta.json and the tokenizer."""
    task.check()
    rng = random.Random(seed)

    def problems() -> Iterator[tuple[str, str]]:
        for _ in range(examples):
            prompt, answer, _ = task.problem(rng)
            yield prompt, answer

    return write_problem_data(out, character_tokenizer(task, task_key, symbols), problems(), examples, source,
                              {source.replace("-", "_"): {**asdict(task), "seed": seed}}, val_fraction, overwrite)

