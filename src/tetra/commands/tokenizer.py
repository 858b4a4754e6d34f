"""`tetra tokenizer train`: a byte-level BPE trained on any source, saved as a Hugging Face tokenizer folder.

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
import itertools

from tetra.commands.common import print_json
from tetra.data.sources import iter_documents
from tetra.data.tokenizer import train_bpe
from tetra.errors import DataError
from tetra.files import atomic_directory

EXAMPLES = """examples:
  tetra tokenizer train stdlib --vocab-size 4096 --out tokenizers/stdlib-4k
  tetra tokenizer train "corpus/*.jsonl" --text-field content --vocab-size 32000 --out tokenizers/corpus-32k
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train tokenizers")
    actions = parser.add_subparsers(dest="action", required=True, metavar="{train}")
    train = actions.add_parser("train", help="train a byte-level BPE tokenizer", epilog=EXAMPLES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("source", help="file, folder, glob, or 'stdlib' (the Python standard library)")
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including special tokens")
    train.add_argument("--out", required=True, help="output folder (tokenizer.json + tokenizer_config.json)")
    train.add_argument("--text-field", default="text", help="field holding the text in .jsonl records")
    train.add_argument("--max-documents", type=int, default=0, help="train on at most this many documents (0 = all)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    train.add_argument("--json", action="store_true", help="print the result as JSON")
    train.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    documents = iter_documents(args.source, args.text_field)
    if args.max_documents:
        documents = itertools.islice(documents, args.max_documents)
    counted = 0

    def counting():
        nonlocal counted
        for document in documents:
            counted += 1
            yield document

    with atomic_directory(args.out, args.overwrite) as staging:
        tokenizer = train_bpe(counting(), args.vocab_size)
        if counted == 0:
            raise DataError(f"{args.source!r} holds no text to train on.")
        tokenizer.save(staging)
    if args.json:
        print_json({"out": args.out, "vocab_size": tokenizer.vocab_size, "documents": counted})
    else:
        print(f"wrote {args.out}: vocabulary of {tokenizer.vocab_size} trained on {counted} documents")
    return 0
