"""Reasoning: web-of-lies chains and small zebra puzzles, generated together with their solution (the zebra
puzzle's clues are drawn until brute force leaves exactly one solution).

Entry point: TASKS.
"""

from __future__ import annotations

import itertools
import random

from tetra.eval.bench.spec import ANSWER_LINE, Task, final_answer, plain

NAMES = ["Ava", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]


def _exact(answer: str, truth: str) -> float:
    return float(plain(final_answer(answer)) == plain(truth))


def web_of_lies(rng: random.Random) -> tuple[str, str]:
    people = rng.sample(NAMES, rng.randint(3, 6))
    truthful = rng.random() < 0.5
    lines = [f"{people[0]} {'tells the truth' if truthful else 'lies'}."]
    for before, person in zip(people, people[1:], strict=False):
        claims_truth = rng.random() < 0.5
        lines.append(f"{person} says {before} {'tells the truth' if claims_truth else 'lies'}.")
        truthful = truthful == claims_truth
    question = f"Does {people[-1]} tell the truth? Answer yes or no."
    return " ".join(lines) + f" {question} {ANSWER_LINE}", "yes" if truthful else "no"


COLORS, PETS = ["red", "green", "blue"], ["cat", "dog", "fish"]


def _clue(rng: random.Random, people: list[str]) -> tuple[str, object]:
    """A clue as text and as a predicate on (house of person, color of house, pet of house)."""
    kind = rng.randrange(4)
    person, color, pet, house = rng.choice(people), rng.choice(COLORS), rng.choice(PETS), rng.randrange(3)
    if kind == 0:
        return f"{person} lives in the {color} house.", lambda h, c, p: c[h[person]] == color
    if kind == 1:
        return f"The {pet} lives in the {color} house.", lambda h, c, p: c[p.index(pet)] == color
    if kind == 2:
        return f"{person} lives in house {house + 1}.", lambda h, c, p: h[person] == house
    return f"{person} does not keep the {pet}.", lambda h, c, p: p[h[person]] != pet


def zebra(rng: random.Random) -> tuple[str, str]:
    people = rng.sample(NAMES, 3)
    worlds = [(dict(zip(people, houses, strict=True)), colors, pets)
              for houses in itertools.permutations(range(3)) for colors in itertools.permutations(COLORS)
              for pets in itertools.permutations(PETS)]
    clues: list[str] = []
    while len(worlds) > 1:
        text, test = _clue(rng, people)
        kept = [world for world in worlds if test(*world)]
        if kept and len(kept) < len(worlds):
            clues.append(text)
            worlds = kept
    houses, _, pets = worlds[0]
    owner = rng.choice(people)
    prompt = (f"Three houses in a row, numbered 1 to 3, are painted red, green and blue (one color each). {people[0]}, "
              f"{people[1]} and {people[2]} live in them, one per house, and each keeps one pet: a cat, a dog or a "
              f"fish. " + " ".join(clues) + f" Which pet does {owner} keep? {ANSWER_LINE}")
    return prompt, pets[houses[owner]]


TASKS = [Task("web_of_lies", "reasoning", web_of_lies, _exact), Task("zebra", "reasoning", zebra, _exact)]
