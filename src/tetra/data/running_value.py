"""Running value, a multi-step reasoning task: a digit followed by operations applied left to right modulo 10, as in
"3+4*2-5=" -> ((3 + 4) * 2 - 5) mod 10 = "9". Each operation needs the value the previous ones left, so a model
must take the steps in order: one layer (or one iteration of a recurrent core) carries the value about one step
further, and the number of operations (the hop count) says how many steps a question takes. Multiplication keeps
the sum trick (adding all the digits at once) from solving it in one go.

Entry points: RunningValueTask, evaluate_program(text), write_running_value_data(...).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tetra.data.arithmetic import write_task_data
from tetra.errors import DataError

TASK_KEY = "tetra_running_value"  # in tokenizer_config.json
OPERATORS = "+-*"
MAX_OPERATIONS = 64


def evaluate_program(text: str) -> int:
    """The value of "d(op d)*" (with or without the trailing "="), left to right, modulo 10."""
    text = text.rstrip("=")
    value = int(text[0])
    for operator, digit in zip(text[1::2], text[2::2], strict=True):
        value = {"+": value + int(digit), "-": value - int(digit), "*": value * int(digit)}[operator] % 10
    return value


@dataclass
class RunningValueTask:
    """Questions of 1..max_hops operations in training, drawn uniformly or (weighting "easy") with probability
    proportional to 1 / hops: a model fed mostly long questions early learns not even the one-step table, while
    one that sees many short ones learns each step and then chains them."""

    max_hops: int = 6
    weighting: str = "easy"  # easy (P(h) ~ 1/h) | uniform

    def check(self) -> None:
        if not 1 <= self.max_hops <= MAX_OPERATIONS:
            raise DataError(f"--max-hops must be in 1..{MAX_OPERATIONS} (got {self.max_hops})")
        if self.weighting not in ("easy", "uniform"):
            raise DataError(f"--weighting {self.weighting!r} is unknown; choose easy or uniform")

    def draw_hops(self, rng: random.Random) -> int:
        if self.weighting == "uniform":
            return rng.randint(1, self.max_hops)
        return rng.choices(range(1, self.max_hops + 1), weights=[1 / h for h in range(1, self.max_hops + 1)])[0]

    def problem(self, rng: random.Random, hops: int | None = None) -> tuple[str, str, int]:
        """(prompt, answer, hops); hops None draws it by the task's weighting."""
        hops = self.draw_hops(rng) if hops is None else hops
        text = str(rng.randrange(10)) + "".join(rng.choice(OPERATORS) + str(rng.randrange(10)) for _ in range(hops))
        return text + "=", str(evaluate_program(text)), hops

    def hop_range(self) -> tuple[int, int]:
        """The operation counts a test may ask about."""
        return 1, MAX_OPERATIONS


def write_running_value_data(out: str | Path, task: RunningValueTask, examples: int, seed: int = 0,
                             val_fraction: float = 0.01, overwrite: bool = False) -> dict[str, Any]:
    """Prepared data of running-value questions (loss on the answer digit and the end token)."""
    return write_task_data(out, task, TASK_KEY, "0123456789+-*=", "running-value", examples, seed, val_fraction,
                           overwrite)
