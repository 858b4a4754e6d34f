"""The long-context task generators. Each renders its prompt at a size of `units` (haystack sentences, documents,
list words), so that samples.py can grow it to a token length; everything random comes from the sample's seed.

Entry points: TASKS ({name: LongTask}), LongTask, Rendered, score_all, score_any.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


def _listed(text: str) -> tuple[str, ...]:
    return tuple(text.split())


FILLER = (
    "The river ran slowly past the old mill.", "A light rain fell over the quiet fields.",
    "Nobody in the village remembered the winter being this mild.", "The baker opened his shop before dawn.",
    "Children walked along the road to the school on the hill.", "The clock in the square struck the hour.",
    "Clouds gathered and drifted east over the valley.", "An old dog slept in the shade of the fence.",
    "The market was busy with people buying bread and apples.", "A boat moved across the lake without a sound.",
    "Leaves turned yellow along the edge of the forest.", "The evening train arrived a few minutes late.",
)
WORDS = _listed(
    "apple river stone candle window garden bottle mirror ladder basket pencil rocket violin saddle lantern "
    "anchor blanket bridge castle compass feather forest harbor helmet island jacket kettle lemon magnet marble "
    "meadow needle orange pepper pillow planet pocket puzzle rabbit ribbon saucer shadow silver spider summer "
    "teapot thunder ticket tomato tunnel velvet wagon walnut whistle winter wizard yellow zipper copper "
    "desert falcon glacier hammer iceberg jungle kitten lobster monkey nectar oyster parrot quartz raven sphinx "
    "tiger unicorn volcano walrus yogurt zebra badger cactus dolphin engine fossil goblin hermit igloo jasmine"
)
SYLLABLES = _listed("ba ko ri te lu mi sa do ne vo ka pe zu fi go ra le ti mo nu")
FIRST_NAMES = _listed("Olga Tomas Irene Viktor Maren Elias Sofia Anton Greta Lukas Ingrid Pavel Hanna Oskar")
LAST_NAMES = _listed("Brandt Novak Keller Lindqvist Moreau Petrov Halvorsen Wagner Costa Berg Varga Meyer")
PRODUCTS = ("copper bells", "blue glass", "wool blankets", "smoked fish", "clay pipes", "silver buttons",
            "paper lanterns", "oak barrels", "honey cakes", "iron nails", "linen shirts", "salt")


@dataclass(frozen=True)
class Rendered:
    """A prompt's parts: the long context, the question after it, the start of the answer, the right answers."""

    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class LongTask:
    """render(rng, units) builds a sample; score(output, answers) is in [0, 1]; max_new_tokens bounds the answer."""

    name: str
    render: Callable[[random.Random, int], Rendered]
    score: Callable[[str, tuple[str, ...]], float]
    max_new_tokens: int


def score_all(output: str, answers: tuple[str, ...]) -> float:
    """Share of the answers the output contains (case-insensitive): RULER's string match for list answers."""
    text = output.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def score_any(output: str, answers: tuple[str, ...]) -> float:
    """1 when the output contains any accepted answer."""
    text = output.lower()
    return float(any(answer.lower() in text for answer in answers))


def _key(rng: random.Random) -> str:
    return f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(3))


def _haystack(units: int, inserts: list[tuple[float, str]]) -> str:
    """`units` filler sentences with each insert placed at its depth (0 = start, 1 = end)."""
    sentences = [FILLER[i % len(FILLER)] for i in range(units)]
    for depth, text in sorted(inserts, key=lambda item: -item[0]):  # deepest first: earlier indices stay valid
        sentences.insert(round(depth * len(sentences)), text)
    return " ".join(sentences)


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _needle_question(key: str) -> tuple[str, str]:
    return (f"What is the special magic number for {key} mentioned in the provided text?",
            f"The special magic number for {key} mentioned in the provided text is")


def _distinct_keys(rng: random.Random, count: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < count:
        key = _key(rng)
        if key not in keys:
            keys.append(key)
    return keys


def needle_single(rng: random.Random, units: int) -> Rendered:
    key, value = _key(rng), _number(rng)
    question, prefix = _needle_question(key)
    return Rendered(_haystack(units, [(rng.random(), _needle(key, value))]), question, prefix, (value,))


def needle_multikey(rng: random.Random, units: int) -> Rendered:
    """The needle among three others with different keys."""
    keys = _distinct_keys(rng, 4)
    values = [_number(rng) for _ in keys]
    inserts = [(rng.random(), _needle(key, value)) for key, value in zip(keys, values, strict=True)]
    question, prefix = _needle_question(keys[0])
    return Rendered(_haystack(units, inserts), question, prefix, (values[0],))


def needle_multivalue(rng: random.Random, units: int) -> Rendered:
    """Four values under the same key: all of them are the answer."""
    key = _key(rng)
    values = [_number(rng) for _ in range(4)]
    inserts = [(rng.random(), _needle(key, value)) for value in values]
    return Rendered(_haystack(units, inserts),
                    f"What are all the special magic numbers for {key} mentioned in the provided text?",
                    f"The special magic numbers for {key} mentioned in the provided text are", tuple(values))


def needle_distractors(rng: random.Random, units: int) -> Rendered:
    """A haystack made of needles: every sentence is a magic number for another key."""
    keys = _distinct_keys(rng, units + 1)
    sentences = [_needle(key, _number(rng)) for key in keys[1:]]
    value = _number(rng)
    sentences.insert(rng.randint(0, len(sentences)), _needle(keys[0], value))
    question, prefix = _needle_question(keys[0])
    return Rendered(" ".join(sentences), question, prefix, (value,))


def variable_tracking(rng: random.Random, units: int) -> Rendered:
    """A chain of five assignments, the first of a number and each next of the previous variable."""
    names: list[str] = []
    while len(names) < 5:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
    depths = sorted(rng.random() for _ in statements)
    return Rendered(_haystack(units, list(zip(depths, statements, strict=True))),
                    f"Find all variables that are assigned the value {value} in the text above.",
                    f"According to the chain of variable assignments in the text above, 5 variables are assigned "
                    f"the value {value}, they are:", tuple(names))


def common_words(rng: random.Random, units: int) -> Rendered:
    """A numbered word list: ten words repeat often, every other word appears twice."""
    common = rng.sample(WORDS, 10)
    repeats = max(3, units // 25)
    rare = []
    while len(rare) < max(1, units // 2):
        word = _pseudo_word(rng)
        if word not in rare:
            rare.append(word)
    listing = common * repeats + rare * 2
    rng.shuffle(listing)
    text = " ".join(f"{index + 1}. {word}" for index, word in enumerate(listing))
    return Rendered(f"Below is a numbered list of words. {text}",
                    "What are the 10 most common words in the above list?",
                    "The 10 words that appear most often in the list are:", tuple(common))


def _town(rng: random.Random) -> dict[str, str]:
    return {"name": "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize() + rng.choice(["holt", "vik", "burg"]),
            "river": "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize(),
            "year": str(rng.randint(1200, 1899)),
            "mayor": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
            "product": rng.choice(PRODUCTS)}


QUESTIONS = {"river": "On which river does {name} lie?", "year": "In which year was {name} founded?",
             "mayor": "Who is the mayor of {name}?", "product": "What is {name} known for?"}


def question_answering(rng: random.Random, units: int) -> Rendered:
    """Short generated documents about fictional towns; one question about one of them."""
    towns: list[dict[str, str]] = []
    while len(towns) < max(2, units // 4):
        town = _town(rng)
        if town["name"] not in {t["name"] for t in towns}:
            towns.append(town)
    documents = [f"Document {index + 1}: {t['name']} is a town on the river {t['river']}. It was founded in "
                 f"{t['year']}. Its mayor is {t['mayor']}. The town is known for its {t['product']}."
                 for index, t in enumerate(towns)]
    target = rng.choice(towns)
    field = rng.choice(sorted(QUESTIONS))
    answers = (target[field], target["mayor"].split()[-1]) if field == "mayor" else (target[field],)
    return Rendered("Answer the question based on the documents. " + " ".join(documents),
                    "Question: " + QUESTIONS[field].format(name=target["name"]), "Answer:", answers)


TASKS: dict[str, LongTask] = {task.name: task for task in (
    LongTask("needle", needle_single, score_all, 16),
    LongTask("needle_multikey", needle_multikey, score_all, 16),
    LongTask("needle_multivalue", needle_multivalue, score_all, 48),
    LongTask("needle_distractors", needle_distractors, score_all, 16),
    LongTask("variable_tracking", variable_tracking, score_all, 32),
    LongTask("common_words", common_words, score_all, 64),
    LongTask("qa", question_answering, score_any, 16),
)}
