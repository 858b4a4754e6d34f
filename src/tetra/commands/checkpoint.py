"""`tetra checkpoint verify`: check training checkpoints against their manifests (each file's size and SHA-256)
by hand, before copying a run elsewhere or after a disk scare.

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tetra.commands.common import print_json
from tetra.errors import CheckpointError
from tetra.train.checkpoint import checkpoint_problems, list_checkpoints

EXAMPLES = """examples:
  tetra checkpoint verify runs/run/checkpoints/step-0001000
  tetra checkpoint verify runs/run                     (every checkpoint of a run, newest last)
  tetra checkpoint verify runs/run --quick --json      (sizes only: one stat per file)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("checkpoint", help="check training checkpoints for damage")
    actions = parser.add_subparsers(dest="action", required=True, metavar="{verify}")
    verify = actions.add_parser("verify", help="check checkpoints against their manifests", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("path", help="a checkpoint folder (RUN/checkpoints/step-N) or a run folder")
    verify.add_argument("--quick", action="store_true", help="compare sizes only, without reading the files")
    verify.add_argument("--json", action="store_true", help="print {folder: [problems]} as JSON")
    verify.set_defaults(handler=run_verify)


def _folders(path: Path) -> list[Path]:
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist. Pass a checkpoint folder (RUN/checkpoints/step-N) or a run "
                              "folder.")
    if (path / "trainer_state.json").is_file() or path.name.startswith("step-"):
        return [path]
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path} holds no training checkpoints (no checkpoints/step-N folders). Pass a "
                              "checkpoint folder or a run folder written by `tetra train`.")
    return found


def run_verify(args: argparse.Namespace) -> int:
    report = {str(folder): checkpoint_problems(folder, hashes=not args.quick) for folder in _folders(Path(args.path))}
    damaged = {folder: problems for folder, problems in report.items() if problems}
    if args.json:
        print_json(report)
    else:
        for folder, problems in report.items():
            print(f"{'DAMAGED' if problems else 'ok':8s} {folder}")
            for problem in problems:
                print(f"         {problem}")
    if damaged:
        raise CheckpointError(f"{len(damaged)} of {len(report)} checkpoints are damaged or incomplete "
                              f"({', '.join(Path(f).name for f in damaged)}). `tetra train ... --resume auto` skips "
                              "them and resumes from the newest sound one; delete them once you have looked.")
    return 0
