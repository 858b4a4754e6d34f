"""`tetra plan`: rank the valid 4D grids for a model on a machine by predicted step time, with memory per device.

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tetra.commands.common import print_json
from tetra.config import RECOMPUTE_PARTS
from tetra.errors import ConfigError
from tetra.model.config import ModelConfig
from tetra.model.io import read_model_config
from tetra.model.presets import PRESETS, preset_config
from tetra.parallel.planner import MachineProfile, Prediction, plan

EXAMPLES = """examples:
  tetra plan --model llama-8b --devices 64 --machine perlmutter --global-batch 512 --seq 4096
  tetra plan --model ./Qwen2.5-7B --devices 16 --machine dgx-h100 --global-batch 256 --seq 2048 --json
  tetra plan --model llama-8b --devices 64 --machine perlmutter --global-batch 512 --seq 4096 --recompute block
  tetra plan --model llama-8b --devices 8 --machine dgx-h100 --global-batch 64 --seq 4096 --finetune lora
  tetra plan --hparams --params 1e9 --tokens 1e11 --seq 4096         (the step law's learning rate and batch)
  tetra plan --hparams --params 2e7 --tokens 4e8 --sweep runs/sweep  (and the law refitted to your own sweep)
machines shipped: perlmutter, frontier, alps, dgx-h100 (or a TOML file of your own)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", help="rank 4D grids by predicted step time", epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"a preset ({', '.join(PRESETS)}) or a model folder")
    parser.add_argument("--devices", type=int, help="number of GPUs (ranks)")
    parser.add_argument("--machine", help="machine profile name or TOML file")
    parser.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    parser.add_argument("--seq", type=int, help="sequence length")
    parser.add_argument("--hparams", action="store_true",
                        help="instead of grids: the step law's peak learning rate and batch for --params/--tokens")
    parser.add_argument("--params", type=float, help="--hparams: non-embedding parameters N")
    parser.add_argument("--tokens", type=float, help="--hparams: training tokens D")
    parser.add_argument("--sweep", help="--hparams: a `tetra sweep` folder to refit the learning-rate law to")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per micro-step")
    parser.add_argument("--zero1", action="store_true", help="optimizer state also sharded over data")
    parser.add_argument("--no-overlap", action="store_true",
                        help="model blocking collectives (parallel.overlap=false): nothing hidden behind compute")
    parser.add_argument("--regather", action="store_true",
                        help="model depth blocks gathered again in backward (parallel.regather=true): one more "
                             "all-gather per layer, no whole block held between forward and backward")
    parser.add_argument("--recompute", default="none", choices=list(RECOMPUTE_PARTS),
                        help="model activation checkpointing (train.activation_checkpointing): whole blocks, or the "
                             "attention or MLP part of each; less activation memory, one more forward of that part")
    parser.add_argument("--finetune", default="full", choices=["full", "lora"],
                        help="lora: a frozen base (bf16, no gradients or optimizer state) with LoRA adapters, as "
                             "[lora] trains it; shows which grid fits a model too big to train whole")
    parser.add_argument("--top", type=int, default=10, help="rows to print")
    parser.add_argument("--json", action="store_true", help="every grid as JSON")
    parser.set_defaults(handler=run)


def _model(name: str) -> ModelConfig:
    return preset_config(name) if name in PRESETS or not Path(name).exists() else read_model_config(name)


def _row(p: Prediction) -> dict:
    gigabytes = {key: round(value / 1e9, 3) for key, value in p.memory.items()}
    return {"grid": vars(p.shape), "step_s": p.step_time, "compute_s": p.compute, "elementwise_s": p.elementwise,
            "overhead_s": p.overhead,
            "collectives_s": dict(p.collectives), "exposed_collectives_s": {k: p.exposed(k) for k in p.collectives},
            "memory_gb": gigabytes, "fits": p.fits}


def run(args: argparse.Namespace) -> int:
    if args.hparams:
        return run_hparams(args)
    missing = [flag for flag, value in (("--model", args.model), ("--devices", args.devices),
                                        ("--machine", args.machine), ("--global-batch", args.global_batch),
                                        ("--seq", args.seq)) if value is None]
    if missing:
        raise ConfigError(f"tetra plan ranks grids and needs {', '.join(missing)} (see --help); for learning rate "
                          "and batch size use tetra plan --hparams --params N --tokens D.")
    machine = MachineProfile.load(args.machine)
    predictions = plan(_model(args.model), args.devices, args.global_batch, args.seq, machine, args.zero1,
                       args.micro_batch, overlap=not args.no_overlap, regather=args.regather,
                       recompute=args.recompute, finetune=args.finetune)
    if args.json:
        print_json({"machine": machine.name, "devices": args.devices, "grids": [_row(p) for p in predictions]})
        return 0
    overlap = "blocking collectives" if args.no_overlap else "overlapped collectives"
    print(f"{len(predictions)} valid grids on {args.devices} x {machine.name}; best first ({overlap})")
    print("times in milliseconds per optimizer step: GEMMs and attention (compute), elementwise work and fixed costs "
          "(other), collectives by the group they run on, the part the step waits for (not hidden behind "
          "computation)")
    print(f"{'data':>4} {'depth':>5} {'row':>3} {'col':>3} {'step':>10} {'compute':>10} {'other':>9} {'col':>9} "
          f"{'row':>9} {'depth':>9} {'data':>9} {'GB/dev':>7}  fits")
    for p in predictions[: args.top]:
        s, c = p.shape, {key: 1000 * p.exposed(key) for key in p.collectives}
        print(f"{s.data:>4} {s.depth:>5} {s.row:>3} {s.col:>3} {1000 * p.step_time:>10.2f} {1000 * p.compute:>10.2f} "
              f"{1000 * (p.elementwise + p.overhead):>9.2f} {c['col']:>9.2f} {c['row']:>9.2f} {c['depth']:>9.2f} "
              f"{c['data']:>9.2f} "
              f"{sum(p.memory.values()) / 1e9:>7.2f}  {'yes' if p.fits else 'no'}")
    return 0


def run_hparams(args: argparse.Namespace) -> int:
    """The step law's learning rate and batch size, and a refit to the user's sweep when given one."""
    from tetra.science.hparams import fit_learning_rate_law, step_law
    from tetra.science.sweep import read_table

    if args.params is None or args.tokens is None:
        raise ConfigError("tetra plan --hparams needs --params N (non-embedding parameters) and --tokens D.")
    law = step_law(args.params, args.tokens)
    report = {"params": args.params, "tokens": args.tokens, "step_law": {"lr": law.lr, "batch_tokens":
                                                                           law.batch_tokens}}
    if args.seq:
        report["step_law"]["batch_sequences"] = law.batch_sequences(args.seq)
    if args.sweep:
        fitted = fit_learning_rate_law(read_table(args.sweep))
        report["sweep_law"] = {"lr": fitted(args.params, args.tokens), "coefficient": fitted.coefficient,
                               "params_exponent": fitted.params_exponent, "tokens_exponent": fitted.tokens_exponent}
    if args.json:
        print_json(report)
        return 0
    batch = f" ({report['step_law']['batch_sequences']} sequences of {args.seq})" if args.seq else ""
    print(f"step law for N = {args.params:.3g} non-embedding parameters, D = {args.tokens:.3g} tokens:")
    print(f"  peak learning rate {law.lr:.3g}, batch {law.batch_tokens:.3g} tokens{batch}")
    if args.sweep:
        fit = report["sweep_law"]
        print(f"  your sweep's law: lr = {fit['coefficient']:.3g} N^{fit['params_exponent']:.3f} "
              f"D^{fit['tokens_exponent']:.3f} -> {fit['lr']:.3g}")
    return 0
