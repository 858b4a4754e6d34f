"""A chat data set tetra builds without downloads: questions about the running Python's standard-library functions,
answered by the first paragraph of their docstrings, plus (optionally) questions about functions that do not exist,
answered with a refusal and marked with `refusal_category: "made_up"` (the two-category set for refusal tokens).

Sources are parsed with `ast`, never imported (importing some modules has side effects). The same Python, seed
and options always give the same records.

Entry point: stdlib_qa_records(count, made_up_fraction, seed) -> list of chat records.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from tetra.data.sources import STDLIB, stdlib_files
from tetra.errors import DataError

QUESTIONS = ("What does {name} do in Python's standard library?", "Explain {name} briefly.",
             "In Python, what is {name} for?", "What is the purpose of {name}?")
MADE_UP_PARTS = ("frobnicate", "zorble", "quantize_keys", "unspool", "transmogrify", "reticulate", "defenestrate",
                 "discombobulate", "flummox", "hornswoggle")


@dataclass(frozen=True)
class Documented:
    """A public function with a docstring: its dotted name and the docstring's first paragraph."""

    name: str
    summary: str


def _summary(docstring: str) -> str:
    first = docstring.strip().split("\n\n", 1)[0]
    return " ".join(line.strip() for line in first.splitlines())


def documented_functions() -> list[Documented]:
    """Every public top-level function of the standard library with a docstring of a sensible length."""
    found = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        if any(part.startswith("_") for part in module.split(".")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                docstring = ast.get_docstring(node)
                summary = _summary(docstring) if docstring else ""
                if 40 <= len(summary) <= 400:
                    found.append(Documented(f"{module}.{node.name}()", summary))
    return found


def stdlib_qa_records(count: int, made_up_fraction: float = 0.0, seed: int = 0) -> list[dict]:
    """`count` chat records; a `made_up_fraction` of them ask about invented functions and refuse."""
    if count < 1 or not 0 <= made_up_fraction < 1:
        raise DataError(f"--records must be positive and --made-up in [0, 1) (got {count}, {made_up_fraction}).")
    functions = documented_functions()
    if not functions:
        raise DataError(f"No documented functions found in the {STDLIB!r} corpus of this Python.")
    rng = random.Random(seed)
    rng.shuffle(functions)
    real_names = {item.name for item in functions}
    modules = sorted({item.name.rsplit(".", 1)[0] for item in functions})
    records: list[dict] = []
    answered = 0
    while len(records) < count:
        question = rng.choice(QUESTIONS)
        if rng.random() < made_up_fraction:
            name = f"{rng.choice(modules)}.{rng.choice(MADE_UP_PARTS)}_{rng.choice(MADE_UP_PARTS)}()"
            if name in real_names:
                continue
            answer = f"I don't know of a function called {name} in Python's standard library."
            records.append({"messages": [{"role": "user", "content": question.format(name=name)},
                                         {"role": "assistant", "content": answer}], "refusal_category": "made_up"})
        else:
            item = functions[answered % len(functions)]
            answered += 1
            records.append({"messages": [{"role": "user", "content": question.format(name=item.name)},
                                         {"role": "assistant", "content": item.summary}]})
    return records
