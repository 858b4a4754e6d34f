"""A pairwise judge over any OpenAI-compatible chat endpoint (tetra serve included): which of two answers to an
instruction is better, as a probability read from the judge's logprobs of "A" and "B" (its answer text when the
endpoint gives no logprobs), asked in both orders so the judge's position bias cancels.

Entry points: EndpointJudge(base_url).first_is_better(instruction, first, second), swapped_preference(...).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tetra.endpoint import chat, first_model

JUDGE_PROMPT = """Two assistants answered the same instruction. Decide which answer is more helpful, correct and \
clear. Length alone is not quality.

Instruction:
{instruction}

Answer A:
{first}

Answer B:
{second}

Which answer is better? Reply with one letter: A or B."""

# The judge's top alternatives read for the letters (the letter may follow a space or sit lower in the list).
TOP_LOGPROBS = 10

Ask = Callable[[str, str, str], float]


def letter_probability(top: list[dict], text: str) -> float:
    """p(A) / (p(A) + p(B)) over the judge's first-token alternatives; the answer text decides without them."""
    mass = {"A": 0.0, "B": 0.0}
    for entry in top:
        letter = entry.get("token", "").strip().upper()
        if letter in mass:
            mass[letter] += math.exp(entry["logprob"])
    if mass["A"] + mass["B"] > 0:
        return mass["A"] / (mass["A"] + mass["B"])
    answer = text.strip().upper()[:1]
    return {"A": 1.0, "B": 0.0}.get(answer, 0.5)


class EndpointJudge:
    """A judge model behind {base_url}/chat/completions (base_url ends in /v1)."""

    def __init__(self, base_url: str, model: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model or first_model(self.base_url)

    def first_is_better(self, instruction: str, first: str, second: str) -> float:
        prompt = JUDGE_PROMPT.format(instruction=instruction, first=first, second=second)
        choice = chat(self.base_url, self.model, [{"role": "user", "content": prompt}], max_tokens=1, temperature=0,
                      logprobs=True, top_logprobs=TOP_LOGPROBS)
        content = (choice.get("logprobs") or {}).get("content") or []
        top = content[0].get("top_logprobs", []) if content else []
        return letter_probability(top, choice["message"].get("content") or "")


def swapped_preference(ask: Ask, instruction: str, model_output: str, baseline_output: str) -> tuple[float, float]:
    """(preference for the model in [0, 1], the judge's position bias: how much more it liked whichever came
    first). The preference averages both orders."""
    model_first = ask(instruction, model_output, baseline_output)
    baseline_first = ask(instruction, baseline_output, model_output)
    return 0.5 * (model_first + 1 - baseline_first), 0.5 * (model_first + baseline_first) - 0.5
