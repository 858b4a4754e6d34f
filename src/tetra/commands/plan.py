"""`tetra plan`: rank the valid 4D grids for a model on a machine by predicted step time, with memory per device.

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tetra.commands.common import print_json
from tetra.model.config import ModelConfig
from tetra.model.io import read_model_config
from tetra.model.presets import PRESETS, preset_config
from tetra.parallel.planner import MachineProfile, Prediction, plan

EXAMPLES = """examples:
  tetra plan --model llama-8b --devices 64 --machine perlmutter --global-batch 512 --seq 4096
  tetra plan --model ./Qwen2.5-7B --devices 16 --machine dgx-h100 --global-batch 256 --seq 2048 --json
machines shipped: perlmutter, frontier, alps, dgx-h100 (or a TOML file of your own)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", help="rank 4D grids by predicted step time", epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=f"a preset ({', '.join(PRESETS)}) or a model folder")
    parser.add_argument("--devices", type=int, required=True, help="number of GPUs (ranks)")
    parser.add_argument("--machine", required=True, help="machine profile name or TOML file")
    parser.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    parser.add_argument("--seq", type=int, required=True, help="sequence length")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per micro-step")
    parser.add_argument("--zero1", action="store_true", help="optimizer state also sharded over data")
    parser.add_argument("--no-overlap", action="store_true",
                        help="model blocking collectives (parallel.overlap=false): nothing hidden behind compute")
    parser.add_argument("--regather", action="store_true",
                        help="model depth blocks gathered again in backward (parallel.regather=true): one more "
                             "all-gather per layer, no whole block held between forward and backward")
    parser.add_argument("--top", type=int, default=10, help="rows to print")
    parser.add_argument("--json", action="store_true", help="every grid as JSON")
    parser.set_defaults(handler=run)


def _model(name: str) -> ModelConfig:
    return preset_config(name) if name in PRESETS or not Path(name).exists() else read_model_config(name)


def _row(p: Prediction) -> dict:
    gigabytes = {key: round(value / 1e9, 3) for key, value in p.memory.items()}
    return {"grid": vars(p.shape), "step_s": p.step_time, "compute_s": p.compute,
            "collectives_s": dict(p.collectives), "exposed_collectives_s": {k: p.exposed(k) for k in p.collectives},
            "memory_gb": gigabytes, "fits": p.fits}


def run(args: argparse.Namespace) -> int:
    machine = MachineProfile.load(args.machine)
    predictions = plan(_model(args.model), args.devices, args.global_batch, args.seq, machine, args.zero1,
                       args.micro_batch, overlap=not args.no_overlap, regather=args.regather)
    if args.json:
        print_json({"machine": machine.name, "devices": args.devices, "grids": [_row(p) for p in predictions]})
        return 0
    overlap = "blocking collectives" if args.no_overlap else "overlapped collectives"
    print(f"{len(predictions)} valid grids on {args.devices} x {machine.name}; best first ({overlap})")
    print("times in milliseconds per optimizer step; collectives by the group they run on, the part the step waits "
          "for (not hidden behind computation)")
    print(f"{'data':>4} {'depth':>5} {'row':>3} {'col':>3} {'step':>10} {'compute':>10} {'col':>9} {'row':>9} "
          f"{'depth':>9} {'data':>9} {'GB/dev':>7}  fits")
    for p in predictions[: args.top]:
        s, c = p.shape, {key: 1000 * p.exposed(key) for key in p.collectives}
        print(f"{s.data:>4} {s.depth:>5} {s.row:>3} {s.col:>3} {1000 * p.step_time:>10.2f} {1000 * p.compute:>10.2f} "
              f"{c['col']:>9.2f} {c['row']:>9.2f} {c['depth']:>9.2f} {c['data']:>9.2f} "
              f"{sum(p.memory.values()) / 1e9:>7.2f}  {'yes' if p.fits else 'no'}")
    return 0
