"""`tetra eval`: measure a model. `harness` runs EleutherAI lm-eval tasks through tetra's backend.

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
import sys

from tetra.commands.common import print_json
from tetra.errors import ConfigError

EXAMPLES = """examples:
  tetra eval harness models/smollm2 --tasks hellaswag,arc_easy --limit 100
  tetra eval harness runs/demo/checkpoints/final --tasks my_task --include-path my_tasks/ --json
  python -m tetra.eval.lm_eval_main --model tetra --model_args path=models/smollm2 --tasks arc_easy
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model (lm-eval tasks, ...)", epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="eval_command", required=True, metavar="WHAT")
    harness = verbs.add_parser("harness", help="run lm-eval tasks on a tetra model", epilog=EXAMPLES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_argument("model", help="tetra checkpoint folder, Hugging Face model folder or .gguf file")
    harness.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    harness.add_argument("--include-path", help="a folder of task YAML files (tasks defined locally)")
    harness.add_argument("--limit", type=int, default=None, help="documents per task (for a quick look)")
    harness.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    harness.add_argument("--batch-size", type=int, default=8, help="sequences scored together")
    harness.add_argument("--tokenizer", help="tokenizer folder, if not the model folder")
    harness.add_argument("--adapter", help="a LoRA adapter folder to apply")
    harness.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    harness.add_argument("--dtype", default="auto", choices=["auto", "keep", "float32", "bfloat16", "float16"])
    harness.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    harness.set_defaults(handler=run_harness)


def _metric_table(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} with lm-eval's ',none' filter suffix dropped and standard errors kept apart."""
    table: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "alias":
                table.setdefault(task, {})[key.removesuffix(",none")] = value
    return table


def run_harness(args: argparse.Namespace) -> int:
    try:
        from tetra.eval.harness import evaluate
    except ImportError:
        raise ConfigError("`tetra eval harness` needs EleutherAI's lm-eval: pip install 'tetra[eval]' "
                          "(or pip install lm-eval).") from None
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise ConfigError("--tasks is empty; name at least one lm-eval task (comma-separated).")
    results = evaluate(args.model, tasks, args.include_path, args.limit, args.num_fewshot, args.batch_size,
                       tokenizer=args.tokenizer, adapter=args.adapter, device=args.device, dtype=args.dtype)
    table = _metric_table(results)
    if args.json:
        print_json(table)
        return 0
    for task, metrics in table.items():
        shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items() if "stderr" not in name)
        sys.stdout.write(f"{task}: {shown}\n")
    return 0
