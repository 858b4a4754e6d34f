"""What every generated task provides, and the answer extraction the scorers share.

Entry points: Task (category, make(rng) -> (prompt, truth), score(answer, truth) -> [0, 1]), final_answer(text).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ANSWER_LINE = "Finish with a last line of the form 'Answer: <your answer>'."


@dataclass(frozen=True)
class Task:
    """One kind of question."""

    name: str
    category: str
    make: Callable[[random.Random], tuple[str, Any]]
    score: Callable[[str, Any], float]


def final_answer(text: str) -> str:
    """The answer a response commits to: \\boxed{...}, else the last 'Answer:' line, else its last non-empty line."""
    boxed = re.findall(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}", text)
    if boxed:
        return boxed[-1].strip()
    marked = re.findall(r"(?im)^\s*\**answer\**\s*[:：]\s*(.+)$", text)
    if marked:
        return marked[-1].strip().strip("*").strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def plain(text: str) -> str:
    """Lowercased, quotes, trailing punctuation and markdown emphasis removed: for exact-match comparisons."""
    return re.sub(r"[\s*`\"'.!]+$", "", re.sub(r"^[\s*`\"']+", "", text.strip().lower()))
