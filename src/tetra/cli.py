"""The `tetra` command: parse arguments, call one function, turn user errors into a message and exit code 2.

Entry point: main(argv) -> exit code.
"""

from __future__ import annotations

import argparse
import sys

from tetra import __version__
from tetra.commands import (
    bench,
    calibrate,
    checkpoint,
    convert,
    data,
    defense,
    evaluate,
    generate,
    init,
    loki,
    memorization,
    plan,
    scaling,
    serve,
    tokenizer,
    train,
)
from tetra.errors import TetraError

COMMAND_GROUPS = (train, checkpoint, generate, serve, evaluate, bench, defense, memorization, data, tokenizer,
                  convert, plan, calibrate, loki, init, scaling)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tetra", description="Pretrain, fine-tune, evaluate and sample GPT-style language models.",
        epilog="Run `tetra COMMAND --help` for a command's options and examples.")
    parser.add_argument("--version", action="version", version=f"tetra {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(subparsers)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting key=value overrides stand anywhere on the line (argparse alone stops at the first option)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "overrides", None) is None or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.handler(args)
    except TetraError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
