"""Language: fixing injected typos (scored by character edit distance to the original) and unscrambling words.

Entry point: TASKS.
"""

from __future__ import annotations

import random

from tetra.eval.bench.spec import ANSWER_LINE, Task, final_answer, plain

WORDS = [
    "river", "garden", "window", "planet", "silver", "candle", "market", "bridge", "winter", "yellow", "forest",
    "button", "letter", "doctor", "travel", "orange", "summer", "pocket", "dinner", "animal", "mirror", "basket",
    "camera", "butter", "island"
]
SENTENCES = ["The quick brown fox jumps over the lazy dog near the river bank.",
             "A small library opened yesterday on the corner of the main street.",
             "Please remember to water the plants before you leave for the weekend.",
             "Our team finished the report early and celebrated with a quiet dinner.",
             "The museum keeps its oldest maps in a cool and very dark room.",
             "Every morning the baker lights the oven long before sunrise."]


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 2)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]  # swap two neighbouring letters


def fix_typos(rng: random.Random) -> tuple[str, str]:
    sentence = rng.choice(SENTENCES)
    words = sentence.split()
    for index in rng.sample(range(len(words)), 3):
        words[index] = _typo(words[index], rng)
    return (f"Fix the spelling mistakes in this sentence and change nothing else: \"{' '.join(words)}\" "
            f"{ANSWER_LINE}", sentence)


def _closeness(answer: str, truth: str) -> float:
    given = final_answer(answer).strip().strip('"').strip()
    return max(0.0, 1 - edit_distance(given, truth) / len(truth))


def unscramble(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    letters = list(word)
    while "".join(letters) == word:
        rng.shuffle(letters)
    return f"Unscramble these letters into a common English word: {''.join(letters)}. {ANSWER_LINE}", word


TASKS = [Task("fix_typos", "language", fix_typos, _closeness),
         Task("unscramble", "language", unscramble, lambda answer, truth: float(plain(final_answer(answer)) == truth))]
