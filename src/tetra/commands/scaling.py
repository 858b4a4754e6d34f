"""`tetra sweep SWEEP.toml` (train a grid of shapes x token budgets x learning rates, resumable) and `tetra scaling
fit SWEEP_DIR` (the approach-3 law, bootstrap intervals, the compute-optimal allocation, plots).

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import operator
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tetra.commands.common import print_json
from tetra.errors import ConfigError

SWEEP_EXAMPLES = """examples:
  tetra sweep configs/sweep-stdlib.toml          (runs every missing point; run again after an interruption)
"""
FIT_EXAMPLES = """examples:
  tetra scaling fit runs/sweep --law chinchilla --budget 1e18
  tetra scaling fit runs/sweep --law width-depth --exclude "params<2e6" --exclude "tokens<4e6"
"""
LAWS = {"chinchilla": ("non_embedding_params", "tokens"), "width-depth": ("width", "depth", "tokens")}
COMPARISONS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "=": operator.eq}


def register(subparsers: argparse._SubParsersAction) -> None:
    sweep = subparsers.add_parser("sweep", help="train a grid of model shapes x token budgets x learning rates",
                                  epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("sweep_file", help="a sweep TOML file ([sweep] base, widths, depths, tokens, lrs, ...)")
    sweep.add_argument("--progress", action="store_true", help="show each run's progress bar")
    sweep.set_defaults(handler=run_sweep_command)
    scaling = subparsers.add_parser("scaling", help="fit scaling laws to a sweep")
    verbs = scaling.add_subparsers(dest="verb", required=True, metavar="{fit}")
    fit = verbs.add_parser("fit", help="the Chinchilla approach-3 fit with bootstrap intervals and plots",
                           epilog=FIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("sweep_dir", help="a folder written by `tetra sweep` (its sweep.json), or the table itself")
    fit.add_argument("--law", choices=sorted(LAWS), default="chinchilla",
                     help="chinchilla: L = E + A/N^a + B/D^b; width-depth: a term each for width, depth, tokens")
    fit.add_argument("--exclude", action="append", default=[], metavar="RULE",
                     help='leave runs out, e.g. "params<2e6" or "tokens<=4e6" (columns of sweep.csv; repeatable)')
    fit.add_argument("--budget", type=float, action="append", default=[],
                     help="FLOPs to print the compute-optimal N and D for (chinchilla; repeatable)")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for the intervals (0 = none)")
    fit.add_argument("--out", help="folder for fit.json and fit.png (default: the sweep folder)")
    fit.add_argument("--json", action="store_true")
    fit.set_defaults(handler=run_fit)


def run_sweep_command(args: argparse.Namespace) -> int:
    from tetra.science.sweep import run_sweep
    from tetra.train.distributed import Launch
    from tetra.train.trainer import train

    launch = Launch.from_environment()

    def train_alone(config, model, resume):
        # Under torchrun every process trains its own runs, each as one plain process: the trainer must not see
        # the launch's world (it would start a grid over all of them).
        with _one_process_environment(launch):
            return train(config, model, resume, show_progress=args.progress)

    rows = run_sweep(args.sweep_file, train_alone, share=(launch.rank, launch.world))
    if launch.rank == 0:
        print(f"{len(rows)} points in the sweep table")
    return 0


@contextlib.contextmanager
def _one_process_environment(launch) -> Iterator[None]:
    """torchrun's and Slurm's rank variables hidden while a run trains (restored after); on a GPU machine the
    process's own GPU (LOCAL_RANK) made the current one."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
             "SLURM_LOCALID")
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    if launch.world > 1:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    try:
        yield
    finally:
        os.environ.update(saved)


def parse_rule(text: str) -> tuple[str, str, float]:
    match = re.fullmatch(r"\s*([a-z_]+)\s*(<=|>=|<|>|=)\s*([-+0-9.eE]+)\s*", text)
    if not match:
        raise ConfigError(f"--exclude {text!r} is not COLUMN<VALUE (or <=, >, >=, =), e.g. \"params<2e6\".")
    column, comparison, value = match.groups()
    return column, comparison, float(value)


def keep_rows(rows: list[dict], rules: list[str]) -> list[dict]:
    """Rows that no --exclude rule matches."""
    parsed = [parse_rule(rule) for rule in rules]
    for column, _, _ in parsed:
        if rows and column not in rows[0]:
            raise ConfigError(f"--exclude names the column {column!r}; the sweep table has "
                              f"{', '.join(rows[0])}.")
    return [row for row in rows if not any(COMPARISONS[c](float(row[col]), v) for col, c, v in parsed)]


def run_fit(args: argparse.Namespace) -> int:
    from tetra.science.scaling_fit import bootstrap, fit_law, intervals
    from tetra.science.scaling_plots import plot_fit
    from tetra.science.sweep import read_table

    rows = keep_rows(read_table(args.sweep_dir), args.exclude)
    names = LAWS[args.law]
    features = np.array([[float(row[name]) for name in names] for row in rows])
    losses = np.array([float(row["loss"]) for row in rows])
    law = fit_law(features, losses, ("params", "tokens") if args.law == "chinchilla" else names)
    fits = bootstrap(features, losses, law, args.bootstrap) if args.bootstrap else []
    report = {"law": args.law, "runs": len(rows), "excluded": args.exclude, **law.as_dict(),
              "intervals_95": intervals(fits), "bootstrap_fits": len(fits)}
    if args.budget and args.law == "chinchilla":
        report["compute_optimal"] = [_allocation(law, fits, budget) for budget in args.budget]
    elif args.budget:
        raise ConfigError("--budget needs --law chinchilla (the allocation of parameters and tokens).")
    out = Path(args.out or (args.sweep_dir if Path(args.sweep_dir).is_dir() else Path(args.sweep_dir).parent))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fit.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    plot_fit(rows, law, features, out / "fit.png")
    if args.json:
        print_json(report)
        return 0
    _print_report(report, out)
    return 0


def _allocation(law, fits, budget: float) -> dict:
    params, tokens = law.compute_optimal(budget)
    spread = [fit.compute_optimal(budget)[0] for fit in fits]
    entry = {"flops": budget, "params": params, "tokens": tokens, "tokens_per_param": tokens / params}
    if spread:
        entry["params_interval_95"] = [float(np.percentile(spread, 2.5)), float(np.percentile(spread, 97.5))]
    return entry


def _print_report(report: dict, out: Path) -> None:
    print(f"{report['law']} law from {report['runs']} runs (Huber objective {report['objective']:.3g}):")
    for key, value in report["parameters"].items():
        interval = report["intervals_95"].get(key)
        bounds = f"   (95% interval {interval[0]:.4g} .. {interval[1]:.4g})" if interval else ""
        print(f"  {key} = {value:.4g}{bounds}")
    for entry in report.get("compute_optimal", []):
        print(f"  compute-optimal at {entry['flops']:.3g} FLOPs: N = {entry['params']:.3g}, D = {entry['tokens']:.3g} "
              f"({entry['tokens_per_param']:.1f} tokens per parameter)")
    print(f"wrote {out / 'fit.json'} and {out / 'fit.png'}")
