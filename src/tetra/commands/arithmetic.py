"""`tetra data arithmetic` (problems written for length generalization) and `tetra eval arithmetic` (exact-match
accuracy by operand length, a table and a heatmap PNG).

Entry points: register_data(actions) and register_eval(verbs), called by commands/data.py and commands/evaluate.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tetra.commands.common import add_model_arguments, load_model_and_tokenizer, print_json
from tetra.data.arithmetic import OPERATIONS, ArithmeticTask, write_arithmetic_data

DATA_EXAMPLES = """examples:
  tetra data arithmetic --op add --max-digits 20 --examples 200000 --out data/add20      (reversed digits)
  tetra data arithmetic --op mul --max-digits 8 --examples 50000 --out data/mul8
  tetra data arithmetic --op sort --count 5 --max-digits 10 --no-reverse --out data/sort
"""
EVAL_EXAMPLES = """examples:
  tetra eval arithmetic runs/add-abacus/checkpoints/final --digits 1-100 --stride 5 --samples 10 --out add.png
  tetra eval arithmetic CHECKPOINT --digits 1-40 --pairs diagonal --samples 50 --json
"""


def register_data(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser("arithmetic", help="write addition, multiplication or sorting problems as prepared "
                                "data (one token per character, loss on the answer)", epilog=DATA_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", default="add", choices=OPERATIONS)
    parser.add_argument("--max-digits", type=int, required=True, help="longest operand in training")
    parser.add_argument("--min-digits", type=int, default=1, help="shortest operand")
    parser.add_argument("--examples", type=int, default=100_000, help="how many problems")
    parser.add_argument("--count", type=int, default=3, help="sort: numbers per list")
    parser.add_argument("--reverse", action=argparse.BooleanOptionalAction, default=True,
                        help="write numbers least-significant digit first (prompt and answer), as the paper does")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.01)
    parser.add_argument("--out", required=True, help="output folder (prepared data, with its tokenizer)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--json", action="store_true", help="print meta.json")
    parser.set_defaults(handler=run_data)


def run_data(args: argparse.Namespace) -> int:
    task = ArithmeticTask(args.op, args.reverse, args.count)
    meta = write_arithmetic_data(args.out, task, args.max_digits, args.examples, args.seed, args.min_digits,
                                 args.val_fraction, args.overwrite)
    if args.json:
        print_json(meta)
    else:
        splits = meta["splits"]
        print(f"wrote {args.out}: {splits['train']['documents']:,} training and {splits['val']['documents']:,} "
              f"validation problems ({args.op}, operands of {args.min_digits}-{args.max_digits} digits, "
              f"{'reversed' if args.reverse else 'most-significant digit first'})")
    return 0


def register_eval(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser("arithmetic", help="exact-match accuracy on fresh arithmetic problems by operand "
                              "length (table + heatmap)", epilog=EVAL_EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--digits", default="1-20", help="operand lengths: a range like 1-100, or one length")
    parser.add_argument("--stride", type=int, default=1, help="step between the lengths of the range")
    parser.add_argument("--pairs", default="all", choices=["all", "diagonal"],
                        help="every (a, b) length pair (a heatmap), or only a = b")
    parser.add_argument("--samples", type=int, default=10, help="problems per length pair")
    parser.add_argument("--batch-size", type=int, default=64, help="problems decoded together")
    parser.add_argument("--op", choices=OPERATIONS, help="override the task the tokenizer records")
    parser.add_argument("--reverse", action=argparse.BooleanOptionalAction, default=None,
                        help="override the digit order the tokenizer records")
    parser.add_argument("--seed", type=int, default=1234, help="the problems are a function of the seed")
    parser.add_argument("--recurrence", type=int, default=None, help="recurrent-depth models: core iterations")
    parser.add_argument("--exit-kl", type=float, default=0.0, help="recurrent-depth models: adaptive exit")
    parser.add_argument("--out", help="PNG path for the heatmap (and a .json beside it)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from tetra.errors import ConfigError
    from tetra.eval.arithmetic import (
        evaluate_arithmetic,
        format_table,
        parse_digit_range,
        plot_accuracy,
        task_of,
    )
    from tetra.infer.recurrence import recurrence_settings

    lengths = parse_digit_range(args.digits, args.stride)
    if args.samples < 1:
        raise ConfigError(f"--samples must be positive (got {args.samples}).")
    model, tokenizer = load_model_and_tokenizer(args)
    task = task_of(tokenizer) if args.op is None else ArithmeticTask(args.op)
    if args.reverse is not None:
        task.reverse = args.reverse
    with recurrence_settings(model, args.recurrence, args.exit_kl):
        result = evaluate_arithmetic(model, tokenizer, task, lengths, args.samples, args.seed, args.pairs,
                                     args.batch_size)
    if args.out:
        out = Path(args.out)
        plot_accuracy(result, out)
        out.with_suffix(".json").write_text(json.dumps(result.to_json(), indent=1), encoding="utf-8")
    if args.json:
        print_json(result.to_json())
    else:
        print(format_table(result))
        if args.out:
            print(f"wrote {args.out}")
    return 0
