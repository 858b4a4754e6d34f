"""Math: generated problems whose answers are checked symbolically with sympy (equal expressions score 1).

Entry point: TASKS.
"""

from __future__ import annotations

import random
import re

import sympy
from sympy.parsing.sympy_parser import (
    convert_xor,
    implicit_multiplication_application,
    parse_expr,
    standard_transformations,
)

from tetra.eval.bench.spec import ANSWER_LINE, Task, final_answer

X = sympy.Symbol("x")


SAFE_EXPRESSION = re.compile(r"[0-9x+\-*/^().\s]+")
READING = (*standard_transformations, implicit_multiplication_application, convert_xor)


def _equivalent(answer: str, truth: str) -> float:
    """1 when the final answer equals the truth as a symbolic expression ('9x + 3', '(x+4)(x+5)', '18/7')."""
    text = final_answer(answer).strip().strip("$").rstrip(".")
    for separator in ("=", " is "):  # "x = 18/7", "The derivative of ... is 6*x + 3": the value after the last
        text = text.rsplit(separator, 1)[-1].strip()
    if not SAFE_EXPRESSION.fullmatch(text):  # parse_expr evaluates Python: only arithmetic in x reaches it
        return 0.0
    try:
        given = parse_expr(text, local_dict={"x": X}, transformations=READING, evaluate=True)
        return float(sympy.simplify(given - sympy.sympify(truth, locals={"x": X})) == 0)
    except Exception:  # sympy raises many kinds on text that is not an expression: all mean "not equal"
        return 0.0


def linear_equation(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.choice([2, 3, 4, 5, 6, 7]), rng.randint(-20, 20), rng.randint(-20, 20)
    solution = sympy.Rational(c - b, a)
    return (f"Solve for x: {a}*x + ({b}) = {c}. Give x as an integer or a fraction. {ANSWER_LINE}", str(solution))


def expand(rng: random.Random) -> tuple[str, str]:
    p, q = rng.randint(-6, 6) or 1, rng.randint(-6, 6) or 2
    expression = (X + p) * (X - q)
    return (f"Expand and simplify {expression} into a polynomial in x. {ANSWER_LINE}",
            str(sympy.expand(expression)))


def derivative(rng: random.Random) -> tuple[str, str]:
    n, k = rng.randint(2, 5), rng.randint(2, 9)
    expression = k * X**n + rng.randint(1, 9) * X
    return (f"What is the derivative with respect to x of {expression}? {ANSWER_LINE}",
            str(sympy.diff(expression, X)))


TASKS = [Task("linear_equation", "math", linear_equation, _equivalent), Task("expand", "math", expand, _equivalent),
         Task("derivative", "math", derivative, _equivalent)]
