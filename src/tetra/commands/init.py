"""`tetra init`: a randomly initialized model from a preset, saved as a tetra checkpoint (for demos and tests).

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse

import torch

from tetra.commands.common import print_json
from tetra.data.tokenizer import TextTokenizer
from tetra.model import Transformer
from tetra.model.io import save_model
from tetra.model.presets import PRESETS, preset_config

EXAMPLES = """examples:
  tetra init --preset tiny --tokenizer tokenizers/stdlib-4k --out checkpoints/tiny-random
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("init", help="create a randomly initialized model", epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model shape")
    parser.add_argument("--tokenizer", help="tokenizer folder: sets the vocabulary and is copied into the checkpoint")
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.add_argument("--seed", type=int, default=0, help="initialization seed")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    overrides = {}
    if args.tokenizer:
        tokenizer = TextTokenizer.load(args.tokenizer)
        overrides = dict(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id,
                         pad_token_id=tokenizer.pad_id)
    config = preset_config(args.preset, **overrides)
    torch.manual_seed(args.seed)
    model = Transformer(config)
    model.init_weights()
    save_model(model, args.out, tokenizer_from=args.tokenizer, overwrite=args.overwrite)
    parameters = sum(p.numel() for p in model.parameters())
    if args.json:
        print_json({"out": args.out, "parameters": parameters})
    else:
        print(f"wrote {args.out}: {args.preset} model with {parameters / 1e6:.1f}M parameters")
    return 0
