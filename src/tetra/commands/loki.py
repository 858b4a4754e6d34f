"""`tetra loki calibrate`: fit Loki's per-layer, per-KV-head PCA of post-rotary keys on some text and store it
beside the model, where `--attention loki` finds it.

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from tetra.commands.common import add_model_arguments, load_model_and_tokenizer, print_json
from tetra.commands.context_args import loki_path_for
from tetra.errors import ConfigError
from tetra.infer.attention.loki_calibration import calibrate_loki

EXAMPLES = """examples:
  tetra loki calibrate models/smollm2 --data notes.txt                (writes models/smollm2/loki.safetensors)
  tetra loki calibrate ./model --data corpus.jsonl --length 2048 --samples 8 --out keys.loki.safetensors
  tetra generate models/smollm2 --prompt "..." --attention loki --budget 0.25 --rank 16
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("loki", help="Loki attention: fit the key PCA a model decodes with",
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    calibrate = verbs.add_parser("calibrate", help="fit the PCA of post-rotary keys on text", epilog=EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(calibrate)
    calibrate.add_argument("--data", required=True, help="text to run through the model: a .txt/.jsonl/.parquet "
                                                         "file or a folder of them")
    calibrate.add_argument("--length", type=int, default=1024, help="tokens per calibration sequence")
    calibrate.add_argument("--samples", type=int, default=16, help="sequences to run")
    calibrate.add_argument("--out", help="where to write it (default: loki.safetensors in the model folder)")
    calibrate.add_argument("--json", action="store_true", help="print the result as one JSON object")
    calibrate.set_defaults(handler=run_calibrate)


def _sequences(documents: Iterator[list[int]], length: int) -> Iterator[list[int]]:
    """The documents' tokens, concatenated and cut into sequences of `length` (the last may be shorter)."""
    buffer: list[int] = []
    for ids in documents:
        buffer.extend(ids)
        while len(buffer) >= length:
            yield buffer[:length]
            buffer = buffer[length:]
    if buffer:
        yield buffer


def run_calibrate(args: argparse.Namespace) -> int:
    from tetra.data.sources import iter_documents

    if args.length < 2 or args.samples < 1:
        raise ConfigError(f"--length must be at least 2 and --samples at least 1 (got {args.length}, {args.samples}).")
    if not Path(args.data).exists():
        raise ConfigError(f"--data {args.data} does not exist; give a text file (.txt, .jsonl) or a folder of them.")
    model, tokenizer = load_model_and_tokenizer(args)
    length = min(args.length, model.config.max_position_embeddings)
    documents = (tokenizer.encode(text) for text in iter_documents(args.data))
    sequences = list(islice(_sequences(documents, length), args.samples))
    if not sequences:
        raise ConfigError(f"--data {args.data} holds no text to calibrate on.")
    basis = calibrate_loki(model, sequences)
    out = Path(args.out) if args.out else loki_path_for(args.model)
    basis.save(out)
    rank = max(1, model.config.resolved_head_dim // 4)
    explained = basis.explained(rank)
    result = {"path": str(out), "tokens": basis.tokens, "sequences": len(sequences), "keys": "post-rotary",
              "rank": rank, "explained_per_layer": [round(x, 4) for x in explained]}
    if args.json:
        print_json(result)
        return 0
    sys.stdout.write(f"wrote {out}: PCA of post-rotary keys from {basis.tokens} tokens ({len(sequences)} sequences); "
                     f"the top {rank} of {model.config.resolved_head_dim} dimensions hold "
                     f"{min(explained):.1%}-{max(explained):.1%} of key energy per layer "
                     f"(mean {sum(explained) / len(explained):.1%})\n")
    return 0
