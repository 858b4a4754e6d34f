"""`tetra data prepare`: tokenize a source into memory-mapped shards for training.

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse

from tetra.commands.common import print_json
from tetra.data.prepare import prepare_data

EXAMPLES = """examples:
  tetra data prepare stdlib --tokenizer tokenizers/stdlib-4k --out data/stdlib
  tetra data prepare "corpus/*.jsonl" --text-field content --tokenizer ./Llama-3.2-1B --out data/corpus
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="prepare training data")
    actions = parser.add_subparsers(dest="action", required=True, metavar="{prepare}")
    prepare = actions.add_parser("prepare", help="tokenize documents into token shards", epilog=EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare.add_argument("source", help="file, folder, glob (.txt, .jsonl, .parquet, ...) or 'stdlib'")
    prepare.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (a tokenizer or a model)")
    prepare.add_argument("--out", required=True, help="output folder")
    prepare.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet records")
    prepare.add_argument("--val-fraction", type=float, default=0.01, help="documents held out for validation")
    prepare.add_argument("--shard-tokens", type=int, default=2**27, help="tokens per shard file")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    prepare.add_argument("--json", action="store_true", help="print meta.json")
    prepare.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    meta = prepare_data(args.source, args.tokenizer, args.out, args.text_field, args.val_fraction,
                        args.shard_tokens, args.overwrite, show_progress=not args.json)
    if args.json:
        print_json(meta)
    else:
        splits = meta["splits"]
        print(f"wrote {args.out}: {splits['train']['tokens']:,} training tokens ({splits['train']['documents']} "
              f"documents), {splits['val']['tokens']:,} validation tokens ({splits['val']['documents']} documents)")
    return 0
