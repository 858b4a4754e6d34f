"""`tetra bench`: a contamination-free benchmark generated from a seed (LiveBench's categories), answered by a
checkpoint or an OpenAI-compatible endpoint and scored objectively.

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tetra.commands.common import add_model_arguments, load_model_and_tokenizer, print_json
from tetra.errors import ConfigError, DataError

EXAMPLES = """examples:
  tetra bench generate --seed 2026 --out bench/2026 --per-task 10
  tetra bench score bench/2026 models/smollm2 --name smollm2
  tetra bench score bench/2026 --endpoint http://127.0.0.1:8000/v1 --name served
  tetra bench score bench/2026 --answers my_answers.jsonl --name mine --json   ({"id", "answer"} per line)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="generated contamination-free benchmark", epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    generate = verbs.add_parser("generate", help="write fresh questions from a seed", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_argument("--seed", type=int, required=True, help="same seed, same questions")
    generate.add_argument("--out", required=True, help="folder for questions.jsonl and benchmark.json")
    generate.add_argument("--per-task", type=int, default=10, help="questions per task")
    generate.set_defaults(handler=run_generate)
    score = verbs.add_parser("score", help="answer the questions and score them", epilog=EXAMPLES,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    score.add_argument("folder", help="a folder written by `tetra bench generate`")
    add_model_arguments(score, optional=True)
    score.add_argument("--endpoint", help="an OpenAI-compatible base URL (…/v1) to answer instead of a local model")
    score.add_argument("--endpoint-model", help="model id at --endpoint (default: the first it lists)")
    score.add_argument("--answers", help="score these answers (JSON lines of {id, answer}) instead of generating")
    score.add_argument("--name", default="model", help="label of the answer and score files written in the folder")
    score.add_argument("--max-new-tokens", type=int, default=384, help="tokens per answer")
    score.add_argument("--batch-size", type=int, default=8, help="local model: questions answered together")
    score.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    score.set_defaults(handler=run_score)


def run_generate(args: argparse.Namespace) -> int:
    from tetra.eval.bench.benchmark import generate_questions, write_questions

    if args.per_task < 1:
        raise ConfigError(f"--per-task must be at least 1 (got {args.per_task}).")
    questions = generate_questions(args.seed, args.per_task)
    write_questions(questions, Path(args.out), args.seed)
    print(f"wrote {len(questions)} questions ({args.per_task} per task, seed {args.seed}) to {args.out}")
    return 0


def _read_answers(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise DataError(f"Answers file {path} does not exist.")
    answers = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
                answers[str(record["id"])] = str(record["answer"])
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path} line {number} is not a JSON object with 'id' and 'answer'.") from None
    return answers


def _answers(args: argparse.Namespace, questions: list[dict]) -> dict[str, str]:
    from tetra.eval.bench.answering import answer_with_endpoint, answer_with_model

    sources = [bool(args.model), bool(args.endpoint), bool(args.answers)]
    if sum(sources) != 1:
        raise ConfigError("Give exactly one source of answers: a MODEL path, --endpoint URL or --answers FILE.")
    if args.answers:
        return _read_answers(Path(args.answers))
    if args.endpoint:
        return answer_with_endpoint(args.endpoint, questions, args.max_new_tokens, args.endpoint_model)
    model, tokenizer = load_model_and_tokenizer(args)

    def progress(done: int, total: int) -> None:
        sys.stderr.write(f"answered {done}/{total}\n")

    return answer_with_model(model, tokenizer, questions, args.max_new_tokens, args.batch_size, progress)


def run_score(args: argparse.Namespace) -> int:
    from tetra.eval.bench.benchmark import read_questions, score_answers, summarize

    folder = Path(args.folder)
    questions = read_questions(folder)
    answers = _answers(args, questions)
    rows = score_answers(questions, answers)
    summary = summarize(rows)
    (folder / f"answers-{args.name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows),
                                                      encoding="utf-8")
    (folder / f"scores-{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print_json(summary)
        return 0
    for category, value in summary["categories"].items():
        tasks = ", ".join(f"{task} {summary['tasks'][task]:.3f}" for task in summary["tasks"]
                          if any(row["task"] == task and row["category"] == category for row in rows))
        print(f"{category:<22} {value:.3f}   ({tasks})")
    print(f"{'overall':<22} {summary['overall']:.3f}   over {summary['questions']} questions")
    return 0
