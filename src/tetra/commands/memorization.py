"""`tetra memorization`: how much of each document's ending a model reproduces from the rest (greedy decoding).

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tetra.commands.common import add_model_arguments, load_model_and_tokenizer, print_json
from tetra.data.sources import iter_documents
from tetra.errors import ConfigError
from tetra.eval.memorization import measure_memorization, plot_histogram

EXAMPLES = """examples:
  tetra memorization runs/demo/checkpoints/step-0000400 --documents canaries.jsonl
  tetra memorization ./Llama-3.2-1B --documents wiki.jsonl --suffix-tokens 32 --json
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("memorization", help="measure verbatim memorization of documents",
                                   description="For each document, greedily decode its last --suffix-tokens tokens "
                                   "from the tokens before them and report the exact-match rate, mean RougeL and the "
                                   "longest matching prefix (mean and histogram).",
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--documents", required=True, help=".jsonl (one {\"text\": ...} per line), text files, ...")
    parser.add_argument("--text-field", default="text", help="JSON field holding the text")
    parser.add_argument("--suffix-tokens", type=int, default=50, help="tokens to reproduce at each document's end")
    parser.add_argument("--max-prefix-tokens", type=int, default=2048, help="prompt with at most this many tokens")
    parser.add_argument("--batch-size", type=int, default=32, help="documents decoded together")
    parser.add_argument("--plot", default="memorization.png", help="histogram of longest matches (PNG)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (with per-document results)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    for name in ("suffix_tokens", "max_prefix_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)}).")
    model, tokenizer = load_model_and_tokenizer(args)
    documents = [tokenizer.encode(text) for text in iter_documents(args.documents, args.text_field)]
    report = measure_memorization(model, documents, args.suffix_tokens, args.max_prefix_tokens, args.batch_size)
    plot = plot_histogram({Path(args.model).name: report}, Path(args.plot))
    if args.json:
        print_json({**report.summary(), "plot": str(plot), "per_document": [vars(r) for r in report.results]})
        return 0
    sys.stdout.write(
        f"documents        {report.documents} ({report.skipped} too short for a {report.suffix_tokens}-token suffix)\n"
        f"exact match      {report.exact_match_rate:.1%}\n"
        f"mean RougeL      {report.mean_rouge_l:.3f}\n"
        f"longest match    {report.mean_longest_match:.1f} of {report.suffix_tokens} tokens on average\n"
        f"suffix loss      {report.mean_suffix_loss:.3f} nats/token (teacher-forced, given the prefix)\n"
        f"histogram        {plot}\n")
    return 0
