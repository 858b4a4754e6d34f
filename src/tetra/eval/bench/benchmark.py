"""The benchmark as files: questions generated from a seed (a different seed, different questions; the same seed,
the same ones), answers from a checkpoint or an endpoint, and scores per question, task, category and overall.

Entry points: ALL_TASKS, generate_questions(seed, per_task), write_questions / read_questions, score_answers(...),
summarize(scores).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tetra.errors import DataError
from tetra.eval.bench import (
    coding_tasks,
    data_tasks,
    instruction_tasks,
    language_tasks,
    math_tasks,
    reasoning_tasks,
)
from tetra.eval.bench.spec import Task

ALL_TASKS: dict[str, Task] = {task.name: task for module in (math_tasks, reasoning_tasks, data_tasks, language_tasks,
                                                              instruction_tasks, coding_tasks) for task in module.TASKS}
QUESTIONS_FILE = "questions.jsonl"


def generate_questions(seed: int, per_task: int) -> list[dict]:
    """per_task fresh questions of every task; each task draws from its own generator seeded by (seed, task)."""
    questions = []
    for name, task in ALL_TASKS.items():
        rng = random.Random(f"{seed}:{name}")
        for number in range(per_task):
            prompt, truth = task.make(rng)
            questions.append({"id": f"{name}-{number}", "category": task.category, "task": name, "prompt": prompt,
                              "truth": truth})
    return questions


def write_questions(questions: list[dict], folder: Path, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / QUESTIONS_FILE).write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    (folder / "benchmark.json").write_text(json.dumps({"seed": seed, "questions": len(questions),
                                                       "tasks": sorted({q["task"] for q in questions})}, indent=2))


def read_questions(folder: Path) -> list[dict]:
    path = folder / QUESTIONS_FILE
    if not path.is_file():
        raise DataError(f"{folder} holds no {QUESTIONS_FILE}; make a benchmark with `tetra bench generate --seed S "
                        f"--out {folder}`.")
    questions = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    unknown = {q["task"] for q in questions} - set(ALL_TASKS)
    if unknown:
        raise DataError(f"{path} has tasks this tetra does not know: {sorted(unknown)}.")
    return questions


def score_answers(questions: list[dict], answers: dict[str, str]) -> list[dict]:
    """One row per question: its score in [0, 1] (a missing answer scores 0)."""
    rows = []
    for question in questions:
        answer = answers.get(question["id"], "")
        score = ALL_TASKS[question["task"]].score(answer, question["truth"])
        rows.append({"id": question["id"], "task": question["task"], "category": question["category"],
                     "score": float(score), "answer": answer})
    return rows


def summarize(rows: list[dict]) -> dict:
    """Means per task, then per category (of its tasks' means), then overall (of the categories'), as LiveBench."""
    tasks: dict[str, list[float]] = {}
    category_of = {}
    for row in rows:
        tasks.setdefault(row["task"], []).append(row["score"])
        category_of[row["task"]] = row["category"]
    task_means = {task: sum(scores) / len(scores) for task, scores in tasks.items()}
    categories: dict[str, list[float]] = {}
    for task, mean in task_means.items():
        categories.setdefault(category_of[task], []).append(mean)
    category_means = {category: sum(means) / len(means) for category, means in categories.items()}
    overall = sum(category_means.values()) / len(category_means) if category_means else 0.0
    return {"overall": overall, "categories": category_means, "tasks": task_means, "questions": len(rows)}
