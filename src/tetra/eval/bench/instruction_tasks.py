"""Instruction following in IFEval's style: a request plus two or three verifiable constraints; the score is the
fraction of constraints the response satisfies.

Entry point: TASKS.
"""

from __future__ import annotations

import random
import re

from tetra.eval.bench.spec import Task

TOPICS = ["the ocean", "learning to cook", "city parks", "old maps", "winter mornings", "public libraries",
          "bicycles", "tea", "rainy days", "the night sky"]
KEYWORDS = ["bright", "quiet", "simple", "history", "friendly", "careful"]


def _constraint(kind: str, rng: random.Random) -> dict:
    if kind == "bullets":
        return {"kind": kind, "n": rng.randint(2, 5)}
    if kind == "keyword":
        return {"kind": kind, "word": rng.choice(KEYWORDS), "n": rng.randint(1, 3)}
    if kind == "max_words":
        return {"kind": kind, "n": rng.choice([30, 50, 80])}
    if kind == "ends_with":
        return {"kind": kind, "text": rng.choice(["Is there anything else?", "That is all.", "Thank you."])}
    return {"kind": kind}  # lowercase, no_commas


def _describe(c: dict) -> str:
    return {"bullets": lambda: f"use exactly {c['n']} bullet points starting with '* '",
            "keyword": lambda: f"use the word '{c['word']}' at least {c['n']} times",
            "max_words": lambda: f"use at most {c['n']} words",
            "ends_with": lambda: f"end your response with the exact phrase '{c['text']}'",
            "lowercase": lambda: "write only lowercase letters",
            "no_commas": lambda: "do not use any commas"}[c["kind"]]()


def _holds(c: dict, text: str) -> bool:
    kind = c["kind"]
    if kind == "bullets":
        return len(re.findall(r"(?m)^\s*\* ", text)) == c["n"]
    if kind == "keyword":
        return len(re.findall(rf"\b{c['word']}\b", text, flags=re.IGNORECASE)) >= c["n"]
    if kind == "max_words":
        return len(text.split()) <= c["n"]
    if kind == "ends_with":
        return text.strip().endswith(c["text"])
    if kind == "lowercase":
        return text == text.lower()
    return "," not in text


def constraints(rng: random.Random) -> tuple[str, list[dict]]:
    kinds = rng.sample(["bullets", "keyword", "max_words", "ends_with", "lowercase", "no_commas"], rng.randint(2, 3))
    chosen = [_constraint(kind, rng) for kind in kinds]
    rules = "; ".join(_describe(c) for c in chosen)
    return f"Write a short text about {rng.choice(TOPICS)}. Rules: {rules}.", chosen


TASKS = [Task("constraints", "instruction_following", constraints,
              lambda answer, truth: sum(_holds(c, answer) for c in truth) / len(truth))]
