"""Samples of the long-context tasks grown to a token length: the largest size whose prompt plus answer budget fits.

Entry points: LongSample, make_samples(tokenizer, task_names, lengths, per_task, seed), parse_lengths("1k,2k").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tetra.data.tokenizer import TextTokenizer
from tetra.errors import ConfigError
from tetra.eval.longctx.tasks import TASKS, LongTask, Rendered


@dataclass(frozen=True)
class LongSample:
    task: str
    length: int  # the target: prompt tokens + the answer budget <= length
    index: int
    prompt_ids: list[int]
    answers: tuple[str, ...]
    max_new_tokens: int


def parse_lengths(text: str) -> list[int]:
    """'1k,2k,4096' -> [1024, 2048, 4096]."""
    lengths = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            lengths.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError:
            raise ConfigError(f"--lengths {text!r}: {part!r} is not a length (write 1k,2k,4096).") from None
    if not lengths or min(lengths) < 128:
        raise ConfigError(f"--lengths {text!r} needs lengths of at least 128 tokens (for example 1k,2k,4k).")
    return lengths


def prompt_ids(tokenizer: TextTokenizer, rendered: Rendered, chat: bool) -> list[int]:
    """The user turn (context, then question), then the assistant's turn opened with the answer's first words."""
    user = f"{rendered.context}\n\n{rendered.question}"
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}]) + rendered.answer_prefix
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(f"{user}\n\n{rendered.answer_prefix}")


def _fit(task: LongTask, seed: str, tokenizer: TextTokenizer, budget: int, chat: bool) -> tuple[list[int], Rendered]:
    """The largest size (binary search over units) whose prompt is at most `budget` tokens."""

    def build(units: int) -> tuple[list[int], Rendered]:
        rendered = task.render(random.Random(seed), units)
        return prompt_ids(tokenizer, rendered, chat), rendered

    low, high = 1, 8
    while len(build(high)[0]) <= budget:
        low, high = high, high * 2
    best = build(low)
    if len(best[0]) > budget:
        raise ConfigError(f"Task {task.name} needs more than {budget} prompt tokens even at its smallest; use a longer "
                          "--lengths value.")
    while high - low > 1:
        middle = (low + high) // 2
        candidate = build(middle)
        if len(candidate[0]) <= budget:
            low, best = middle, candidate
        else:
            high = middle
    return best


def make_samples(tokenizer: TextTokenizer, task_names: list[str], lengths: list[int], per_task: int,
                 seed: int, chat: bool | None = None) -> list[LongSample]:
    """per_task samples of each task at each length; the same seed gives the same samples."""
    unknown = [name for name in task_names if name not in TASKS]
    if unknown:
        raise ConfigError(f"Unknown long-context task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}.")
    chat = bool(tokenizer.chat_template) if chat is None else chat
    samples = []
    for length in lengths:
        for name in task_names:
            task = TASKS[name]
            for index in range(per_task):
                ids, rendered = _fit(task, f"{seed}/{name}/{length}/{index}", tokenizer,
                                     length - task.max_new_tokens, chat)
                samples.append(LongSample(name, length, index, ids, rendered.answers, task.max_new_tokens))
    return samples
