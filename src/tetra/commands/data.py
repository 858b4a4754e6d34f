"""`tetra data prepare`, `inspect` and `verify`: tokenize a source (text, or conversations with a loss mask) into
memory-mapped shards for training, show what a prepared dataset trains on, and check its files' checksums.

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tetra.commands.arithmetic import register_data as register_arithmetic_data
from tetra.commands.common import print_json
from tetra.commands.reasoning import register_data as register_reachability_data
from tetra.data.chat import FORMATS, TRAIN_ON
from tetra.data.inspect import inspect_records
from tetra.data.prepare import prepare_data
from tetra.data.prepare_chat import TOO_LONG, ChatOptions
from tetra.data.refusal import RefusalTokens
from tetra.data.shards import PreparedData
from tetra.data.stdlib_qa import stdlib_qa_records
from tetra.errors import ConfigError, DataError
from tetra.integrity import has_manifest

EXAMPLES = """examples:
  tetra data prepare stdlib --tokenizer tokenizers/stdlib-4k --out data/stdlib
  tetra data prepare "corpus/*.jsonl" --text-field content --tokenizer ./Llama-3.2-1B --out data/corpus
  tetra data prepare chats.jsonl --format chat --tokenizer ./smollm2 --out data/sft --max-length 1024
  tetra data prepare alpaca.jsonl --format alpaca --tokenizer ./smollm2 --out data/alpaca --train-on all
"""
GENERATE_EXAMPLES = """examples:
  tetra data generate stdlib-qa --out data/stdlib-qa.jsonl --records 800
  tetra data generate stdlib-qa --out data/refusal.jsonl --made-up 0.3     (for --refusal-tokens)
  tetra data generate --endpoint http://127.0.0.1:8000/v1 --generator prompt.txt --count 500 --out data/gen.jsonl
"""
INSPECT_EXAMPLES = """examples:
  tetra data inspect data/sft --records 3          (each token beside 1 = trained, . = not trained)
  tetra data inspect runs/run --position 1204      (what the run trained on at a loss spike's data position)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="prepare and inspect training data")
    actions = parser.add_subparsers(dest="action", required=True,
                                    metavar="{prepare,inspect,verify,generate,arithmetic,reachability,running-value}")
    prepare = actions.add_parser("prepare", help="tokenize documents or conversations into token shards",
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare.add_argument("source", help="file, folder, glob (.txt, .jsonl, .parquet, ...) or 'stdlib'")
    prepare.add_argument("--tokenizer", required=True,
                         help="folder with tokenizer.json (a tokenizer or a model), or a .gguf model file")
    prepare.add_argument("--out", required=True, help="output folder")
    prepare.add_argument("--format", default="text", choices=FORMATS,
                         help="text: plain documents; chat: {messages: [{role, content}]}; alpaca: {instruction, "
                              "input, output}; sharegpt: {conversations: [{from, value}]}")
    prepare.add_argument("--train-on", default="assistant", choices=TRAIN_ON,
                         help="which tokens of a conversation the loss trains on")
    prepare.add_argument("--max-length", type=int, default=0,
                         help="tokens per conversation at most (0 = no limit); train with data.seq_len >= this - 1")
    prepare.add_argument("--too-long", default="drop", choices=TOO_LONG, help="what happens to longer conversations")
    prepare.add_argument("--refusal-tokens", choices=["binary", "categories"],
                         help="start every reply with [respond], or with [refuse] (binary) / [refuse:CATEGORY] "
                              "(categories) when the record has a refusal_category; grows the vocabulary")
    prepare.add_argument("--skip-bad-records", action="store_true",
                         help="count and skip malformed records instead of stopping at the first")
    prepare.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet records")
    prepare.add_argument("--val-fraction", type=float, default=0.01, help="documents held out for validation")
    prepare.add_argument("--shard-tokens", type=int, default=2**27, help="tokens per shard file")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    prepare.add_argument("--json", action="store_true", help="print meta.json")
    prepare.set_defaults(handler=run)
    inspect = actions.add_parser("inspect", help="print a prepared dataset's tokens beside their loss mask",
                                 epilog=INSPECT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("folder", help="a folder written by `tetra data prepare`, or with --position a run folder")
    inspect.add_argument("--position", type=int,
                         help="show the sequences a training run read at this data position (micro-batch index, as "
                              "a loss-spike warning names it); FOLDER is then the run folder")
    inspect.add_argument("--records", type=int, default=3, help="how many documents to show")
    inspect.add_argument("--split", default="train", choices=["train", "val"])
    inspect.add_argument("--json", action="store_true", help="print the records as JSON")
    inspect.set_defaults(handler=run_inspect)
    generate = actions.add_parser("generate", help="write a chat data set tetra builds itself (no download)",
                                  epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_argument("kind", nargs="?", choices=["stdlib-qa", "instructions"], default=None,
                          help="stdlib-qa: questions about standard-library functions answered by their docstrings; "
                               "instructions (implied by --endpoint): tasks and answers asked of a model")
    generate.add_argument("--out", required=True, help="the .jsonl file to write (instructions: appended, resumable)")
    generate.add_argument("--records", "--count", type=int, default=None,
                          help="how many conversations (stdlib-qa: 800; instructions: required)")
    generate.add_argument("--endpoint", help="instructions: an OpenAI-compatible base URL (…/v1)")
    generate.add_argument("--generator", help="instructions: a text file with the prompt that asks for one task")
    generate.add_argument("--model", help="instructions: model id at the endpoint (default: the first it lists)")
    generate.add_argument("--multi-turn", type=float, default=0.3, help="instructions: share given a second turn")
    generate.add_argument("--concurrency", type=int, default=8, help="instructions: requests in flight at once")
    generate.add_argument("--max-tokens", type=int, default=256, help="instructions: tokens per task or answer")
    generate.add_argument("--made-up", type=float, default=0.0,
                          help="share of questions about functions that do not exist, answered with a refusal "
                               "(refusal_category 'made_up', for --refusal-tokens)")
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(handler=run_generate)
    verify = actions.add_parser("verify", help="check a prepared dataset's files against their recorded SHA-256",
                                epilog="examples:\n  tetra data verify data/stdlib\n",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("folder", help="a folder written by `tetra data prepare` (or `tetra data arithmetic`, ...)")
    verify.set_defaults(handler=run_verify)
    register_arithmetic_data(actions)
    register_reachability_data(actions)


def run_verify(args: argparse.Namespace) -> int:
    """Every byte against the manifest (opening the data for training checks only the sizes)."""
    data = PreparedData.open(args.folder)
    if not has_manifest(data.folder):
        raise DataError(f"{data.folder} has no manifest.json (it was prepared before tetra recorded checksums), so "
                        "there is nothing to check it against. Prepare it again to get one.")
    data.verify(hashes=True)
    print(f"ok {data.folder}: every file matches its recorded size and SHA-256")
    return 0


def run(args: argparse.Namespace) -> int:
    chat = None
    if args.format != "text":
        refusal = RefusalTokens(args.refusal_tokens) if args.refusal_tokens else None
        chat = ChatOptions(args.format, args.train_on, args.max_length, args.too_long, args.skip_bad_records,
                           refusal)
    elif args.refusal_tokens:
        raise DataError("--refusal-tokens marks assistant replies, so it needs --format chat, alpaca or sharegpt.")
    meta = prepare_data(args.source, args.tokenizer, args.out, args.text_field, args.val_fraction,
                        args.shard_tokens, args.overwrite, show_progress=not args.json, chat=chat)
    if args.json:
        print_json(meta)
    else:
        splits = meta["splits"]
        trained = f", {meta['records']['trained_tokens']:,} trained tokens" if chat is not None else ""
        print(f"wrote {args.out}: {splits['train']['tokens']:,} training tokens ({splits['train']['documents']} "
              f"documents), {splits['val']['tokens']:,} validation tokens ({splits['val']['documents']} documents)"
              + trained)
    return 0


def run_generate_instructions(args: argparse.Namespace) -> int:
    from tetra.data.instructions import InstructionPlan, generate_instructions

    if not args.endpoint or not args.generator or not args.records:
        raise ConfigError("Generating instructions needs --endpoint URL, --generator PROMPT.txt and --count N.")
    prompt_file = Path(args.generator)
    if not prompt_file.is_file() or not prompt_file.read_text(encoding="utf-8").strip():
        raise ConfigError(f"--generator {prompt_file} is missing or empty; it should hold the prompt that asks the "
                          "model for one new task (say, 'Write one question a Python programmer might ask').")
    if not 0 <= args.multi_turn <= 1:
        raise ConfigError(f"--multi-turn must lie in [0, 1] (got {args.multi_turn}).")
    plan = InstructionPlan(args.endpoint, prompt_file.read_text(encoding="utf-8").strip(), args.records,
                           Path(args.out), args.model, args.multi_turn, args.concurrency, args.seed, args.max_tokens)

    def progress(stats) -> None:
        end = "\r" if sys.stderr.isatty() else "\n"
        sys.stderr.write(f"{stats.kept}/{plan.count} kept after {stats.attempts} attempts "
                         f"(rejected: {stats.rejected}){end}")

    stats = generate_instructions(plan, progress)
    print(f"{args.out}: {stats.kept} conversations after {stats.attempts} attempts; rejected {stats.rejected}"
          + ("" if stats.kept >= plan.count else " (attempts ran out before --count)"))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    if args.kind == "instructions" or (args.kind is None and args.endpoint):
        return run_generate_instructions(args)
    if args.kind is None:
        raise ConfigError("Say what to generate: `tetra data generate stdlib-qa ...`, or pass --endpoint for "
                          "instructions asked of a model.")
    records = stdlib_qa_records(args.records or 800, args.made_up, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    staging.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    staging.replace(out)
    refusals = sum("refusal_category" in record for record in records)
    print(f"wrote {out}: {len(records)} conversations ({refusals} about made-up functions)")
    return 0


def run_inspect_position(args: argparse.Namespace) -> int:
    """The sequences of a run's micro-batch at a data position (a loss spike's warning names them)."""
    from tetra.data.tokenizer import TextTokenizer
    from tetra.train.loop import global_micro_batch

    batch, data = global_micro_batch(Path(args.folder), args.position)
    tokenizer = TextTokenizer.load(data.tokenizer_folder)
    rows = [tokenizer.decode(row.tolist(), skip_special_tokens=False) for row in batch.tokens]
    if args.json:
        print_json({"position": args.position, "ids": batch.tokens.tolist(), "text": rows})
        return 0
    for number, text in enumerate(rows):
        print(f"--- position {args.position}, sequence {number} ({batch.tokens.shape[1]} tokens)")
        print(text)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    if args.position is not None:
        return run_inspect_position(args)
    records = inspect_records(args.folder, args.records, args.split)
    if args.json:
        print_json([{"tokens": [piece for piece, _, _ in record], "ids": [token for _, token, _ in record],
                     "trained": [trained for _, _, trained in record]} for record in records])
        return 0
    for number, record in enumerate(records):
        trained = sum(flag for _, _, flag in record)
        print(f"--- document {number}: {len(record)} tokens, {trained} trained")
        for piece, token, flag in record:
            print(f"{'1' if flag else '.'} {token:>7} {piece!r}")
    return 0
