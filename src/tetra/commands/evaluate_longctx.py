"""`tetra eval longctx`: accuracy on generated long-context tasks per task and length, under dense attention and
each decoding policy and budget asked for (one prefill per sample serves them all); a table and a heatmap PNG.

Entry point: register_longctx(verbs) (called by commands/evaluate.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tetra.commands.common import add_model_arguments, load_model_and_tokenizer, print_json
from tetra.commands.context_args import loki_path_for
from tetra.errors import ConfigError
from tetra.eval.longctx.report import format_table, plot_heatmap, summarize
from tetra.eval.longctx.runner import check_context, evaluate_policies
from tetra.eval.longctx.samples import make_samples, parse_lengths
from tetra.eval.longctx.tasks import TASKS
from tetra.infer.attention.loki import LokiBasis
from tetra.infer.attention.policy import INDEX_KINDS, POLICIES, AttentionPolicy

EXAMPLES = """examples:
  tetra eval longctx models/smollm2 --lengths 1k,2k,4k --per-task 5 --out runs/longctx
  tetra eval longctx models/smollm2 --lengths 2k,4k,8k --attention topk,h2o --budget 0.02,0.1 --prefill-chunk 1024
  tetra eval longctx ./model --tasks needle,qa --lengths 4k --attention loki --budget 0.25 --rank 16 --json
"""


def register_longctx(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser("longctx", help="generated long-context tasks (needles, variable tracking, common "
                              "words, QA) per length and attention policy", epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--lengths", default="1k,2k,4k", help="comma-separated task lengths in tokens (1k = 1024)")
    parser.add_argument("--tasks", default="all", help=f"comma-separated, or all: {', '.join(TASKS)}")
    parser.add_argument("--per-task", type=int, default=5, help="samples of each task at each length")
    parser.add_argument("--seed", type=int, default=0, help="the samples are a function of the seed")
    parser.add_argument("--attention", default="dense",
                        help=f"comma-separated policies to compare with dense: {', '.join(POLICIES)}")
    parser.add_argument("--budget", default="0.02", help="comma-separated budgets (shares of the prefix, or key "
                                                         "counts above 1), each run with each policy")
    parser.add_argument("--recent", type=int, default=64, help="newest tokens always attended densely")
    parser.add_argument("--rank", type=int, default=None, help="loki: scoring dimensions (default head_dim / 4)")
    parser.add_argument("--index", default="flat", choices=INDEX_KINDS, help="topk-index: the FAISS index kind")
    parser.add_argument("--probe", type=float, default=0.25, help="topk-index with ivf: share of lists searched")
    parser.add_argument("--loki", metavar="FILE", help="loki: the calibration (default: beside the model)")
    parser.add_argument("--prefill-chunk", type=int, default=0, metavar="TOKENS", help="prefill chunk (0 = whole)")
    parser.add_argument("--no-chat", action="store_true", help="plain prompts even if the model has a chat template")
    parser.add_argument("--out", help="folder for results.jsonl, summary.json and heatmap.png")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.set_defaults(handler=run_longctx)


def _policies(args: argparse.Namespace) -> dict[str, AttentionPolicy]:
    """Dense, then every (policy, budget) pair asked for, by label."""
    kinds = [kind.strip() for kind in args.attention.split(",") if kind.strip()]
    try:
        budgets = [float(value) for value in args.budget.split(",") if value.strip()]
    except ValueError:
        raise ConfigError(f"--budget {args.budget!r} is not a comma-separated list of numbers.") from None
    loki = args.loki or str(loki_path_for(args.model))
    policies = {"dense": AttentionPolicy()}
    for kind in kinds:
        if kind == "dense":
            continue
        if kind == "loki":
            LokiBasis.load(loki)
        for budget in budgets:
            policy = AttentionPolicy(kind, budget, args.recent, args.rank, args.index, args.probe,
                                     loki if kind == "loki" else None)
            policies[policy.describe()] = policy
    return policies


def run_longctx(args: argparse.Namespace) -> int:
    lengths = parse_lengths(args.lengths)
    tasks = list(TASKS) if args.tasks.strip() == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.per_task < 1:
        raise ConfigError(f"--per-task must be at least 1 (got {args.per_task}).")
    policies = _policies(args)
    out = Path(args.out) if args.out else None
    if out is not None and (out / "summary.json").exists() and not args.overwrite:
        raise ConfigError(f"{out} already holds long-context results; pass --overwrite or another --out.")
    model, tokenizer = load_model_and_tokenizer(args)
    check_context(model, lengths)
    samples = make_samples(tokenizer, tasks, lengths, args.per_task, args.seed, chat=False if args.no_chat else None)

    def progress(done: int, total: int) -> None:
        sys.stderr.write(f"\r{done}/{total} samples")
        sys.stderr.flush()

    results = evaluate_policies(model, tokenizer, samples, policies, args.prefill_chunk, progress)
    sys.stderr.write("\n")
    summary = summarize(results)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "results.jsonl", "w") as handle:
            for result in results:
                handle.write(json.dumps(result.as_dict()) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        plot_heatmap(summary, out / "heatmap.png")
    if args.json:
        print_json(summary)
        return 0
    sys.stdout.write(format_table(summary) + "\n")
    if out is not None:
        sys.stdout.write(f"wrote {out}/results.jsonl, summary.json and heatmap.png\n")
    return 0
