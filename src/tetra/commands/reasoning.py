"""`tetra data reachability` / `tetra data running-value` (multi-step reasoning questions: reachability in small
random graphs, and a digit carried through operations modulo 10) and `tetra eval reachability` / `tetra eval
running-value` (accuracy by hop count, at any test-time recurrence of a recurrent-depth or looped model).

Entry points: register_data(actions) and register_eval(verbs), called by commands/data.py and commands/evaluate.py.
"""

from __future__ import annotations

import argparse

from tetra.commands.common import add_model_arguments, load_model_and_tokenizer, print_json
from tetra.data.reachability import ReachabilityTask, write_reachability_data
from tetra.data.running_value import RunningValueTask, write_running_value_data

EXAMPLES = """examples:
  tetra data reachability --nodes 10 --edges 12 --max-hops 4 --examples 100000 --out data/reach
  tetra data running-value --max-hops 6 --examples 200000 --out data/running
  tetra eval reachability runs/reach/checkpoints/step-0002000 --hops 0-8 --samples 100 --recurrence 32
  tetra eval running-value runs/running/checkpoints/step-0002000 --hops 1-12 --recurrence 16 --exit-kl 5e-4
"""


def _common_data_arguments(parser: argparse.ArgumentParser, examples: int) -> None:
    parser.add_argument("--examples", type=int, default=examples)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.01)
    parser.add_argument("--out", required=True, help="output folder (prepared data, with its tokenizer)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def register_data(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser("reachability", help="write graph-reachability questions as prepared data (a "
                                "multi-step reasoning task; loss on the answer)", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10, help="nodes per graph (the digits 0..N-1; at most 10)")
    parser.add_argument("--edges", type=int, default=12, help="directed edges per graph")
    parser.add_argument("--max-hops", type=int, default=4, help="longest shortest path of a reachable question")
    _common_data_arguments(parser, 100_000)
    parser.set_defaults(handler=run_reachability_data)
    running = actions.add_parser("running-value", help="write running-value questions (a digit through operations "
                                 "mod 10, left to right) as prepared data; loss on the answer", epilog=EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    running.add_argument("--max-hops", type=int, default=6, help="most operations in a training question")
    running.add_argument("--weighting", choices=("easy", "uniform"), default="easy",
                         help="how training questions' operation counts are drawn: easy (P ~ 1/count, so each step "
                              "is learned before long chains) or uniform")
    _common_data_arguments(running, 200_000)
    running.set_defaults(handler=run_running_value_data)


def run_reachability_data(args: argparse.Namespace) -> int:
    task = ReachabilityTask(args.nodes, args.edges, args.max_hops)
    meta = write_reachability_data(args.out, task, args.examples, args.seed, args.val_fraction, args.overwrite)
    print(f"wrote {args.out}: {meta['splits']['train']['documents']:,} training and "
          f"{meta['splits']['val']['documents']:,} validation questions ({args.nodes} nodes, {args.edges} edges, "
          f"up to {args.max_hops} hops)")
    return 0


def run_running_value_data(args: argparse.Namespace) -> int:
    meta = write_running_value_data(args.out, RunningValueTask(args.max_hops, args.weighting), args.examples,
                                    args.seed, args.val_fraction, args.overwrite)
    print(f"wrote {args.out}: {meta['splits']['train']['documents']:,} training and "
          f"{meta['splits']['val']['documents']:,} validation questions (1 to {args.max_hops} operations, "
          f"{args.weighting} weighting)")
    return 0


def register_eval(verbs: argparse._SubParsersAction) -> None:
    for name, hops, what in (("reachability", "0-4", "hop counts to ask about (0 = unreachable), e.g. 0-8"),
                             ("running-value", "1-8", "operation counts to ask about, e.g. 1-12")):
        parser = verbs.add_parser(name, help=f"accuracy on fresh {name} questions by hop count", epilog=EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        add_model_arguments(parser)
        parser.add_argument("--hops", default=hops, help=what)
        parser.add_argument("--samples", type=int, default=100, help="questions per hop count")
        parser.add_argument("--seed", type=int, default=1234)
        parser.add_argument("--recurrence", type=int, default=None,
                            help="recurrent-depth or looped models: iterations per forward call")
        parser.add_argument("--exit-kl", type=float, default=0.0,
                            help="recurrent-depth or looped models: adaptive exit threshold")
        parser.add_argument("--json", action="store_true")
        parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from tetra.errors import ConfigError
    from tetra.eval.arithmetic import parse_digit_range
    from tetra.eval.multistep import evaluate_by_hops, task_of
    from tetra.infer.recurrence import recurrence_settings

    low, _, high = args.hops.partition("-")
    hops = [0, *parse_digit_range(f"1-{high}")] if low == "0" and high else parse_digit_range(args.hops)
    if args.samples < 1:
        raise ConfigError(f"--samples must be positive (got {args.samples}).")
    model, tokenizer = load_model_and_tokenizer(args)
    with recurrence_settings(model, args.recurrence, args.exit_kl) as iterations:
        accuracy = evaluate_by_hops(model, tokenizer, task_of(tokenizer), hops, args.samples, args.seed)
    mean = sum(iterations) / len(iterations) if iterations else None
    if args.json:
        print_json({"accuracy": accuracy, "mean_iterations": mean})
        return 0
    print("| hops | accuracy |\n| ---: | ---: |")
    for h, value in accuracy.items():
        print(f"| {h} | {100 * value:.1f}% |")
    if mean is not None:
        print(f"iterations per forward call: {mean:.2f}")
    return 0
