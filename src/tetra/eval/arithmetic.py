"""Exact-match accuracy on arithmetic problems by operand length: greedy answers, compared character for character
with the true answer, for every (length a, length b) pair asked for; a heatmap of the grid.

The problems are fresh draws (seeded), written the way the checkpoint's tokenizer records its training task
(operation, reversed digits), so a model is asked what it was taught, at any length.

Entry points: parse_digit_range(text), evaluate_arithmetic(model, tokenizer, ...), plot_accuracy(...).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tetra.data.arithmetic import TASK_KEY, ArithmeticTask, sample_operands
from tetra.data.tokenizer import TextTokenizer
from tetra.errors import ConfigError
from tetra.infer.generate import generate_ids
from tetra.model import Transformer


def parse_digit_range(text: str, stride: int = 1) -> list[int]:
    """'1-40' -> 1, 1 + stride, ..., up to 40 (always including 40); '12' -> [12]."""
    try:
        low, _, high = text.partition("-")
        first, last = int(low), int(high or low)
    except ValueError:
        raise ConfigError(f"--digits {text!r} is not a range like 1-40 or a single length like 12.") from None
    if not 1 <= first <= last or stride < 1:
        raise ConfigError(f"--digits needs 1 <= first <= last and --stride >= 1 (got {text!r}, stride {stride}).")
    lengths = list(range(first, last + 1, stride))
    return lengths if lengths[-1] == last else [*lengths, last]


def task_of(tokenizer: TextTokenizer) -> ArithmeticTask:
    """The task the tokenizer was written for by `tetra data arithmetic`."""
    recorded = tokenizer.extra_config.get(TASK_KEY)
    if not isinstance(recorded, dict):
        raise ConfigError("This model's tokenizer records no arithmetic task (tokenizer_config.json has no "
                          f"{TASK_KEY!r}); evaluate a checkpoint trained on `tetra data arithmetic` data, or pass "
                          "--op and --reverse/--no-reverse.")
    return ArithmeticTask(**recorded)


@dataclass
class ArithmeticResult:
    """Accuracy per (length a, length b); sorting uses the one length of all its numbers (a = b)."""

    task: ArithmeticTask
    lengths: list[int]
    correct: dict[tuple[int, int], int] = field(default_factory=dict)
    total: dict[tuple[int, int], int] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)

    def accuracy(self, a: int, b: int) -> float | None:
        return self.correct[a, b] / self.total[a, b] if self.total.get((a, b)) else None

    def by_length(self) -> dict[int, float]:
        """Accuracy over the problems whose longer operand has each length."""
        rows: dict[int, list[int]] = {}
        for (a, b), total in self.total.items():
            counts = rows.setdefault(max(a, b), [0, 0])
            counts[0] += self.correct[a, b]
            counts[1] += total
        return {length: correct / total for length, (correct, total) in sorted(rows.items())}

    def to_json(self) -> dict:
        return {"task": vars(self.task), "lengths": self.lengths, "by_length": self.by_length(),
                "cells": [{"a": a, "b": b, "correct": self.correct[a, b], "total": total}
                          for (a, b), total in sorted(self.total.items())], "examples": self.examples}


def evaluate_arithmetic(model: Transformer, tokenizer: TextTokenizer, task: ArithmeticTask, lengths: list[int],
                        samples: int, seed: int = 0, pairs: str = "all", batch_size: int = 64) -> ArithmeticResult:
    """Greedy answers to `samples` problems per length pair ('all' pairs, or the 'diagonal' a = b)."""
    if pairs not in ("all", "diagonal"):
        raise ConfigError(f"--pairs {pairs!r} is unknown; choose all or diagonal.")
    rng = random.Random(seed)
    grid = [(a, b) for a in lengths for b in lengths] if pairs == "all" and task.op != "sort" else \
        [(a, a) for a in lengths]
    problems = []
    for a, b in grid:
        for _ in range(samples):
            operand_lengths = (a, b) if task.op != "sort" else (a,) * task.operand_count()
            operands = sample_operands(task, operand_lengths, rng)
            problems.append(((a, b), task.prompt(operands), task.answer(operands)))
    result = ArithmeticResult(task, lengths)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            prompts = [tokenizer.encode(prompt, add_special_tokens=False) for _, prompt, _ in chunk]
            longest = max(len(tokenizer.encode(answer, add_special_tokens=False)) for _, _, answer in chunk)
            outputs = generate_ids(model, prompts, longest + 1, eos_ids=model.config.eos_token_ids)
            for (cell, prompt, answer), output in zip(chunk, outputs, strict=True):
                text = tokenizer.decode(output, skip_special_tokens=True)
                right = text == answer
                result.correct[cell] = result.correct.get(cell, 0) + int(right)
                result.total[cell] = result.total.get(cell, 0) + 1
                if len(result.examples) < 5 and not right:
                    result.examples.append({"prompt": prompt, "answer": answer, "output": text})
    return result


def format_table(result: ArithmeticResult) -> str:
    lines = ["| longer operand (digits) | accuracy |", "| ---: | ---: |"]
    lines += [f"| {length} | {100 * accuracy:.1f}% |" for length, accuracy in result.by_length().items()]
    return "\n".join(lines)


def plot_accuracy(result: ArithmeticResult, path: Path, title: str = "") -> None:
    """The (length a x length b) heatmap, or accuracy against length when only a = b was asked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = result.lengths
    figure, axis = plt.subplots(figsize=(6, 5))
    if len(result.total) == len(lengths) ** 2 and len(lengths) > 1:
        grid = [[result.accuracy(a, b) for b in lengths] for a in lengths]
        image = axis.imshow(grid, origin="lower", vmin=0, vmax=1, cmap="viridis", aspect="auto",
                            extent=(lengths[0] - 0.5, lengths[-1] + 0.5, lengths[0] - 0.5, lengths[-1] + 0.5))
        figure.colorbar(image, ax=axis, label="exact-match accuracy")
        axis.set_xlabel("digits of the second operand")
        axis.set_ylabel("digits of the first operand")
    else:
        by_length = result.by_length()
        axis.plot(list(by_length), list(by_length.values()), marker="o")
        axis.set_ylim(-0.02, 1.02)
        axis.set_xlabel("digits per operand")
        axis.set_ylabel("exact-match accuracy")
    axis.set_title(title or f"{result.task.op}: accuracy by operand length")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
