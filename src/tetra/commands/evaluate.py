"""`tetra eval`: measure a model. `harness` runs EleutherAI lm-eval tasks through tetra's backend; `perplexity`
scores prepared data or text with a sliding window; `winrate` has a judge compare two models' answers and fits
the length-controlled win rate; `longctx` runs generated long-context tasks under each attention policy.

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
import sys
from itertools import islice
from pathlib import Path

from tetra.commands.arithmetic import register_eval as register_arithmetic_eval
from tetra.commands.common import add_model_arguments, load_model_and_tokenizer, print_json
from tetra.commands.evaluate_longctx import register_longctx
from tetra.commands.reasoning import register_eval as register_reachability_eval
from tetra.errors import ConfigError

EXAMPLES = """examples:
  tetra eval perplexity demo/run/checkpoints/step-0000400 --data demo/data --split val
  tetra eval perplexity models/smollm2 --data notes.txt --context 1024 --stride 512 --json
  tetra eval winrate --model-outputs mine.jsonl --baseline-outputs base.jsonl --judge http://127.0.0.1:8000/v1
  tetra eval winrate --model-outputs mine.jsonl --baseline-outputs base.jsonl --judge models/smollm2
  tetra eval harness models/smollm2 --tasks hellaswag,arc_easy --limit 100
  tetra eval longctx models/smollm2 --lengths 1k,2k,4k --attention topk,h2o --budget 0.02 --out runs/longctx
  tetra eval harness runs/demo/checkpoints/final --tasks my_task --include-path my_tasks/ --json
  python -m tetra.eval.lm_eval_main --model tetra --model_args path=models/smollm2 --tasks arc_easy
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model (lm-eval tasks, ...)", epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="eval_command", required=True, metavar="WHAT")
    harness = verbs.add_parser("harness", help="run lm-eval tasks on a tetra model", epilog=EXAMPLES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_argument("model", help="tetra checkpoint folder, Hugging Face model folder or .gguf file")
    harness.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    harness.add_argument("--include-path", help="a folder of task YAML files (tasks defined locally)")
    harness.add_argument("--limit", type=int, default=None, help="documents per task (for a quick look)")
    harness.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    harness.add_argument("--batch-size", type=int, default=8, help="sequences scored together")
    harness.add_argument("--tokenizer", help="tokenizer folder, if not the model folder")
    harness.add_argument("--adapter", help="a LoRA adapter folder to apply")
    harness.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    harness.add_argument("--dtype", default="auto", choices=["auto", "keep", "float32", "bfloat16", "float16"])
    harness.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    harness.set_defaults(handler=run_harness)
    perplexity = verbs.add_parser("perplexity", help="perplexity on prepared data or text (sliding window)",
                                  epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(perplexity)
    perplexity.add_argument("--data", required=True,
                            help="a prepared data folder (tetra data prepare) or text: a .txt/.jsonl file or folder")
    perplexity.add_argument("--split", default="val", help="split of prepared data: val or train")
    perplexity.add_argument("--context", type=int, default=None, help="window length (default: the model's)")
    perplexity.add_argument("--stride", type=int, default=None,
                            help="tokens a window advances (default: half the context; = context: disjoint)")
    perplexity.add_argument("--max-documents", type=int, default=None, help="score only the first N documents")
    perplexity.add_argument("--json", action="store_true", help="print the result as one JSON object")
    perplexity.set_defaults(handler=run_perplexity)
    register_longctx(verbs)
    register_arithmetic_eval(verbs)
    register_reachability_eval(verbs)
    winrate = verbs.add_parser("winrate", help="length-controlled win rate of one model's answers over another's",
                               epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    winrate.add_argument("--model-outputs", required=True, help='JSON lines of {"instruction", "output"}')
    winrate.add_argument("--baseline-outputs", required=True, help="the same instructions answered by the baseline")
    winrate.add_argument("--judge", required=True,
                         help="an OpenAI-compatible base URL (…/v1), or a model folder/.gguf served here for it")
    winrate.add_argument("--judge-model", help="model id at the judge URL (default: the first it lists)")
    winrate.add_argument("--concurrency", type=int, default=8, help="judgements in flight at once")
    winrate.add_argument("--annotations", help="write each pair's preference and position bias here (JSON lines)")
    winrate.add_argument("--json", action="store_true", help="print the result as one JSON object")
    winrate.set_defaults(handler=run_winrate)


def _metric_table(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} with lm-eval's ',none' filter suffix dropped and standard errors kept apart."""
    table: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "alias":
                table.setdefault(task, {})[key.removesuffix(",none")] = value
    return table


def run_harness(args: argparse.Namespace) -> int:
    try:
        from tetra.eval.harness import evaluate
    except ImportError:
        raise ConfigError("`tetra eval harness` needs EleutherAI's lm-eval: pip install 'tetra[eval]' "
                          "(or pip install lm-eval).") from None
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise ConfigError("--tasks is empty; name at least one lm-eval task (comma-separated).")
    results = evaluate(args.model, tasks, args.include_path, args.limit, args.num_fewshot, args.batch_size,
                       tokenizer=args.tokenizer, adapter=args.adapter, device=args.device, dtype=args.dtype)
    table = _metric_table(results)
    if args.json:
        print_json(table)
        return 0
    for task, metrics in table.items():
        shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items() if "stderr" not in name)
        sys.stdout.write(f"{task}: {shown}\n")
    return 0


def _prepared_documents(folder: Path, split: str, model_vocab: int):
    from tetra.data.shards import PreparedData

    data = PreparedData.open(folder)
    if data.vocab_size > model_vocab:
        raise ConfigError(f"{folder} was tokenized with a vocabulary of {data.vocab_size}, larger than the model's "
                          f"{model_vocab}: it belongs to another tokenizer. Prepare it with the model's tokenizer.")
    tokens = data.split(split)
    start = 0
    for length in tokens.document_lengths().tolist():
        yield tokens.read(start, length).astype("int64").tolist()
        start += length


def run_perplexity(args: argparse.Namespace) -> int:
    from tetra.data.sources import iter_documents
    from tetra.eval.perplexity import perplexity_of

    model, tokenizer = load_model_and_tokenizer(args)
    folder = Path(args.data)
    total_bytes = None
    if (folder / "meta.json").is_file():
        documents = islice(_prepared_documents(folder, args.split, model.config.vocab_size), args.max_documents)
    else:
        texts = list(islice(iter_documents(args.data), args.max_documents))
        total_bytes = sum(len(text.encode("utf-8")) for text in texts)
        documents = (tokenizer.encode(text) for text in texts)
    result = perplexity_of(model, documents, args.context, args.stride, total_bytes)
    if args.json:
        print_json(result.as_dict())
        return 0
    bits = f", {result.bits_per_byte:.4f} bits/byte" if result.bits_per_byte is not None else ""
    sys.stdout.write(f"perplexity {result.perplexity:.4f} (loss {result.nll:.4f} nats/token{bits}) over "
                     f"{result.tokens} tokens of {result.documents} documents; context {result.context}, "
                     f"stride {result.stride}\n")
    return 0


def _judge_and_fit(args: argparse.Namespace, url: str, judge_model: str | None, pairs: list) -> dict:
    from tetra.eval.judge import EndpointJudge
    from tetra.eval.winrate import judge_pairs, save_annotations, win_rates

    judge = EndpointJudge(url, judge_model)
    annotations = judge_pairs(judge.first_is_better, pairs, args.concurrency)
    if args.annotations:
        save_annotations(annotations, args.annotations)
    result = win_rates(annotations).as_dict()
    result["mean_position_bias"] = sum(a.position_bias for a in annotations) / len(annotations)
    return result


def run_winrate(args: argparse.Namespace) -> int:
    from tetra.eval.winrate import pair_outputs, read_outputs

    pairs = pair_outputs(read_outputs(args.model_outputs), read_outputs(args.baseline_outputs))
    if len(pairs) < 2:
        raise ConfigError("A win rate needs at least two instructions answered by both models.")
    if args.judge.startswith(("http://", "https://")):
        result = _judge_and_fit(args, args.judge, args.judge_model, pairs)
    else:
        from tetra.data.gguf_tokenizer import load_tokenizer
        from tetra.devices import resolve_device
        from tetra.model.io import load_model
        from tetra.serve.listen import BackgroundServer
        from tetra.serve.server import Server

        judge_path = Path(args.judge)
        if not judge_path.exists():
            raise ConfigError(f"--judge {args.judge} is neither an http(s) URL nor an existing model folder or file.")
        model = load_model(judge_path, device=resolve_device("auto"))
        server = Server(model, load_tokenizer(judge_path), "judge", max_batch_size=max(1, args.concurrency))
        with BackgroundServer(server) as url:
            result = _judge_and_fit(args, url + "/v1", "judge", pairs)
    if args.json:
        print_json(result)
        return 0
    sys.stdout.write(f"length-controlled win rate {result['lc_win_rate']:.2f} ± {result['lc_standard_error']:.2f}, "
                     f"raw win rate {result['raw_win_rate']:.2f} ± {result['raw_standard_error']:.2f} over "
                     f"{result['instructions']} instructions (length coefficient {result['length_coefficient']:.3f},"
                     f" judge position bias {result['mean_position_bias']:+.3f})\n")
    return 0
