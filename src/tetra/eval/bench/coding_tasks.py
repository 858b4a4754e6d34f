"""Coding: small functions specified in words, judged by hidden tests run in a separate Python process with a time
and memory limit, an empty environment, a scratch directory and sockets disabled. That keeps honest mistakes
(endless loops, stray writes, network calls) contained; it is not a sandbox for hostile code.

Entry point: TASKS, run_tests(code, function, cases) -> fraction passed.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tempfile

from tetra.eval.bench.spec import Task

TIME_LIMIT_S = 10
MEMORY_LIMIT_BYTES = 1 << 30
NAMES = ["transform", "solve", "compute", "process", "evaluate", "answer"]
PRELUDE = """import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the benchmark's test runner")
_socket.socket = _no_network
_socket.create_connection = _no_network
"""


def _specs(rng: random.Random) -> list[tuple[str, object, object]]:
    """(description, reference function, input maker) triples with parameters drawn from rng."""
    k, m = rng.randint(2, 5), rng.randint(3, 9)
    return [
        (f"takes a list of integers and returns the sum of the squares of the numbers divisible by {k}",
         lambda xs: sum(x * x for x in xs if x % k == 0),
         lambda r: [[r.randint(-20, 20) for _ in range(r.randint(0, 8))]]),
        (f"takes a string and returns how many of its characters are vowels (a, e, i, o, u, either case), times {k}",
         lambda s: k * sum(c in "aeiouAEIOU" for c in s),
         lambda r: ["".join(r.choice("abcdeIOUxyz ") for _ in range(r.randint(0, 12)))]),
        ("takes a list and an integer n and returns the list rotated left by n positions (n may exceed the length; "
         "an empty list stays empty)", lambda xs, n: xs[n % len(xs):] + xs[: n % len(xs)] if xs else [],
         lambda r: [[r.randint(0, 9) for _ in range(r.randint(0, 6))], r.randint(0, 10)]),
        (f"takes a non-negative integer n and returns the n-th term of the sequence a(0) = 0, a(1) = 1, "
         f"a(n) = a(n-1) + {k} * a(n-2)", _recurrence(k), lambda r: [r.randint(0, 15)]),
        (f"takes a list of integers and returns a new list with each element replaced by the running maximum "
         f"modulo {m}", lambda xs: [max(xs[: i + 1]) % m for i in range(len(xs))],
         lambda r: [[r.randint(0, 50) for _ in range(r.randint(0, 7))]]),
    ]


def _recurrence(k: int):
    def term(n: int) -> int:
        a, b = 0, 1
        for _ in range(n):
            a, b = b, b + k * a
        return a
    return term


def function_task(rng: random.Random) -> tuple[str, dict]:
    specs = _specs(rng)
    index = rng.randrange(len(specs))
    description, reference, make_input = specs[index]
    name = f"{rng.choice(NAMES)}_{rng.randint(10, 99)}"
    cases = []
    for _ in range(6):
        args = make_input(rng)
        cases.append({"args": args, "expected": reference(*args)})
    prompt = (f"Write a Python function `{name}` that {description}. Reply with the function in one ```python code "
              "block; no input() and no printing.")
    return prompt, {"function": name, "cases": cases}


def extract_code(answer: str) -> str:
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", answer, flags=re.DOTALL)
    return max(blocks, key=len) if blocks else answer


def _limits() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (TIME_LIMIT_S, TIME_LIMIT_S))


def run_tests(code: str, function: str, cases: list[dict]) -> float:
    """Fraction of cases the code passes, run in a fresh, limited interpreter (0 on a crash or timeout)."""
    checks = "\n".join(
        f"try:\n    _passed += {function}(*{json.dumps(c['args'])}) == {json.dumps(c['expected'])}\n"
        "except Exception:\n    pass" for c in cases)
    script = f"{PRELUDE}\n{code}\n\n_passed = 0\n{checks}\nprint('PASSED', _passed)\n"
    with tempfile.TemporaryDirectory(prefix="tetra-bench-") as scratch:
        try:
            result = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True,
                                    cwd=scratch, env={}, timeout=TIME_LIMIT_S,
                                    preexec_fn=_limits if sys.platform != "win32" else None)
        except subprocess.TimeoutExpired:
            return 0.0
    found = re.findall(r"^PASSED (\d+)$", result.stdout, flags=re.MULTILINE)
    return int(found[-1]) / len(cases) if found else 0.0


TASKS = [Task("functions", "coding", function_task,
              lambda answer, truth: run_tests(extract_code(answer), truth["function"], truth["cases"]))]
