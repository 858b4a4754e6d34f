"""`tetra train CONFIG.toml [key=value ...]`: train or fine-tune a model; resumable.

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse

from tetra.commands.common import print_json
from tetra.config import load_run_config
from tetra.train.distributed import is_main_rank, stop_distributed
from tetra.train.trainer import train

EXAMPLES = """examples:
  tetra train configs/tiny-stdlib.toml
  tetra train configs/tiny-stdlib.toml train.max_steps=200 model.n_layers=2 run.dir=runs/quick
  tetra train configs/tiny-stdlib.toml --resume auto         (continue from the newest checkpoint)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train or fine-tune a model", epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="TOML run configuration (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-3")
    parser.add_argument("--resume", help="'auto' (newest checkpoint of the run) or a checkpoint folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config, explicit_model = load_run_config(args.config, args.overrides)
    succeeded = False
    try:
        result = train(config, explicit_model, resume=args.resume, show_progress=not args.no_progress)
        main = is_main_rank()  # asked before the process group is gone
        succeeded = True
    finally:
        stop_distributed(succeeded)
    if not main:
        return 0
    summary = {"run_dir": str(result.run_dir), "step": result.step, "loss": result.last_loss,
               "checkpoint": str(result.checkpoint), "stopped_by": result.stopped_by}
    if args.json:
        print_json(summary)
    else:
        print(f"trained to step {result.step} (loss {result.last_loss:.4f}); checkpoint {result.checkpoint}")
    return 0
