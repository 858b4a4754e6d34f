"""Calibrating and measuring the baseline jailbreak defenses: perplexity-filter thresholds from benign prompts at a
chosen false-positive rate, detection rates on attack prompts, and the adversarial suffixes the experiment uses.

Entry points: read_prompts(path), calibrate_filter(model, benign_ids, false_positive_rate),
flag_rate(model, filter_, prompts), random_suffix(vocab, length, rng), optimized_looking_suffix(words, length, rng).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from tetra.errors import DataError
from tetra.infer.prompt_filter import WINDOW, PerplexityFilter, prompt_scores
from tetra.model import Transformer

# Pieces optimized suffixes (GCG and the like) are made of: word fragments, markup, stray punctuation.
SUFFIX_PUNCTUATION = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["](", "**", "\\!", "--", "==", ">>", "}}"]


def _record_prompt(record: object) -> str | None:
    if isinstance(record, dict):
        for key in ("prompt", "instruction", "text"):
            if isinstance(record.get(key), str):
                return record[key]
        turns = [message.get("content") for message in record.get("messages", [])
                 if isinstance(message, dict) and message.get("role") == "user"]
        if turns and isinstance(turns[-1], str):
            return turns[-1]
    return None


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or JSON lines (prompt / instruction / text, or the last user turn of
    chat messages)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Prompts file {path} does not exist.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            prompt = _record_prompt(json.loads(line))
        except json.JSONDecodeError:
            prompt = None
        if prompt is None:
            raise DataError(f"{path} line {number} is not a JSON record with a prompt, instruction, text or user "
                            "message.")
        prompts.append(prompt)
    return prompts


def calibrate_filter(model: Transformer, benign: list[list[int]], false_positive_rate: float,
                     window: int = WINDOW) -> PerplexityFilter:
    """Thresholds at the (1 - rate / 2) quantile of each score over the benign prompts, so that (by the union
    bound) at most `false_positive_rate` of such prompts trip either."""
    if not 0 < false_positive_rate < 1:
        raise ValueError(f"false-positive rate must lie in (0, 1) (got {false_positive_rate})")
    if len(benign) < 2:
        raise ValueError("calibration needs at least two benign prompts")
    scores = [prompt_scores(model, ids, window) for ids in benign]
    quantile = 1 - false_positive_rate / 2
    whole = float(np.quantile([s.whole for s in scores], quantile, method="higher"))
    worst = float(np.quantile([s.worst_window for s in scores], quantile, method="higher"))
    return PerplexityFilter(whole, worst, window, false_positive_rate)


def flag_rate(model: Transformer, filter_: PerplexityFilter, prompts: list[list[int]]) -> float:
    """Fraction of prompts the filter flags."""
    return sum(filter_.check(model, ids) is not None for ids in prompts) / max(1, len(prompts))


def random_suffix(vocab_size: int, length: int, rng: random.Random) -> list[int]:
    """Uniformly random token ids: the crudest adversarial suffix."""
    return [rng.randrange(vocab_size) for _ in range(length)]


def optimized_looking_suffix(words: list[str], length: int, rng: random.Random) -> str:
    """Text shaped like a GCG suffix: real word pieces, capitalized fragments and punctuation run together
    ('describing.\\ + similarlyNow write oppositeley.]( Me giving**ONE'), `length` pieces long."""
    pieces = []
    for _ in range(length):
        roll = rng.random()
        if roll < 0.45:
            word = rng.choice(words)
            pieces.append(word.capitalize() if rng.random() < 0.3 else word)
        elif roll < 0.8:
            pieces.append(rng.choice(SUFFIX_PUNCTUATION))
        else:
            word = rng.choice(words)
            pieces.append(word[: rng.randint(1, max(1, len(word)))] + rng.choice(words).capitalize())
    glue = [rng.choice(["", " "]) for _ in pieces]
    return "".join(g + p for g, p in zip(glue, pieces, strict=True)).strip()
