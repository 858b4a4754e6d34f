"""`tetra generate`: sample text from a tetra checkpoint or a Hugging Face folder, streaming to the terminal.

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from tetra.commands.common import add_model_arguments, load_model_and_tokenizer, print_json
from tetra.commands.context_args import add_context_arguments, context_options
from tetra.config import ParallelConfig
from tetra.data.bpe_dropout import DropoutBPE
from tetra.data.gguf_tokenizer import load_tokenizer
from tetra.data.refusal import refusal_table
from tetra.devices import resolve_device, resolve_dtype
from tetra.errors import ConfigError
from tetra.infer.prompt_filter import PerplexityFilter
from tetra.infer.recurrence import recurrence_settings
from tetra.infer.refusal import decide_refusals
from tetra.infer.sampling import SamplingConfig
from tetra.infer.text import generate_text
from tetra.parallel.decoding import load_split_model
from tetra.train.distributed import Launch, is_main_rank, start_grid, stop_distributed

EXAMPLES = """examples:
  tetra generate runs/demo/checkpoints/final --prompt "def fibonacci(n):" --max-new-tokens 64
  tetra generate ./Llama-3.2-1B --prompt "The capital of France is" --temperature 0
  tetra generate ./model --prompt "a" --prompt "b" --json      (batched, machine-readable)
  tetra generate ./model --prompt "$(cat long.txt) Summary:" --attention topk --budget 0.02 --prefill-chunk 2048
  torchrun --nproc-per-node 4 -m tetra generate ./big-model --grid row=2,col=2 --prompt "Hello"
      (tensor-parallel decoding: each process loads and holds only its share of the weights and the KV cache)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="sample text from a model", epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    parser.add_argument("--refusal-threshold", type=float, default=None, metavar="TAU",
                        help="models trained with refusal tokens: refuse when p(refuse) >= TAU (every category)")
    parser.add_argument("--refusal", action="append", default=[], metavar="CATEGORY=TAU",
                        help="a threshold for one refusal category (repeatable; 0 enforces, 1 suppresses it)")
    parser.add_argument("--perplexity-filter", metavar="FILE",
                        help="refuse prompts this calibrated filter flags (tetra defense calibrate writes it)")
    parser.add_argument("--retokenize", type=float, default=0.0, metavar="P",
                        help="BPE-dropout: encode prompts skipping each merge with probability P (0.4 is the "
                             "defense's usual value; seeded by --seed)")
    parser.add_argument("--recurrence", type=int, default=None, metavar="R",
                        help="recurrent-depth models: core iterations per token (default: the trained mean)")
    parser.add_argument("--exit-kl", type=float, default=0.0, metavar="KL",
                        help="recurrent-depth models: stop iterating once successive outputs differ by less than "
                             "this KL divergence (0 = always run R)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parser.add_argument("--grid", metavar="row=R,col=C,depth=D",
                        help="under torchrun: how the launched processes split the model (default: row = every "
                             "process, so attention heads, MLP width and vocabulary are split); data takes the rest")
    add_context_arguments(parser)
    parser.set_defaults(handler=run)


def _thresholds(args: argparse.Namespace, categories: list[str]) -> dict[str, float]:
    """--refusal-threshold for every category, then --refusal CATEGORY=TAU for single ones."""
    thresholds = dict.fromkeys(categories, args.refusal_threshold) if args.refusal_threshold is not None else {}
    for text in args.refusal:
        name, _, value = text.partition("=")
        try:
            thresholds[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--refusal {text!r} is not CATEGORY=TAU (for example --refusal violence=0.3).") from None
    return thresholds


def _screen(model, tokenizer, args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """{prompt index: its scores} for the prompts --perplexity-filter flags (reported on stderr), else {}."""
    if not args.perplexity_filter:
        return {}
    guard = PerplexityFilter.load(args.perplexity_filter)
    flagged = {}
    for index, prompt in enumerate(args.prompt):
        scores = guard.check(model, tokenizer.encode(prompt))
        if scores is not None:
            flagged[index] = {"whole": scores.whole, "worst_window": scores.worst_window}
            sys.stderr.write(f"prompt {index + 1} flagged by the perplexity filter (mean NLL {scores.whole:.2f} vs "
                             f"{guard.whole_threshold:.2f}, worst {guard.window}-token window "
                             f"{scores.worst_window:.2f} vs {guard.window_threshold:.2f}); not answered\n")
    return flagged


def _retokenizer(tokenizer, args: argparse.Namespace, user_text_of: dict[str, str]):
    """--retokenize's encoder for generate_text: BPE-dropout on the prompt, or, with --chat, on the user's text only
    (the template around it keeps its usual tokens)."""
    if not args.retokenize:
        return None
    dropout = DropoutBPE(tokenizer, args.retokenize, args.seed or 0)
    if not args.chat:
        return dropout.encode
    return lambda text, add_special_tokens=False: dropout.encode_chat(
        [{"role": "user", "content": user_text_of[text]}])


def parse_grid(text: str) -> dict[str, int]:
    """--grid row=2,col=2 -> {"row": 2, "col": 2}."""
    sizes = {}
    for item in text.split(","):
        name, _, value = (part.strip() for part in item.partition("="))
        if name not in ("data", "depth", "row", "col") or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--grid {text!r}: each part must be NAME=N, NAME one of data, depth, row, col and N at "
                              "least 1 (for example --grid row=2,col=2).")
        sizes[name] = int(value)
    return sizes


def _load(args: argparse.Namespace):
    """(model, tokenizer, on a grid?): one process loads the whole model; processes launched by torchrun (or --grid)
    load only their pieces of it (parallel.decoding)."""
    if Launch.from_environment().world == 1 and not args.grid:
        return (*load_model_and_tokenizer(args), False)
    if args.adapter:
        raise ConfigError("--adapter is not supported on a grid yet: merge the adapter first (tetra convert "
                          "merge-lora) or generate in one process.")
    sizes = parse_grid(args.grid) if args.grid else {"row": Launch.from_environment().world}
    grid, device = start_grid(ParallelConfig(**sizes), resolve_device(args.device))
    tokenizer = load_tokenizer(Path(args.tokenizer or args.model))
    model = load_split_model(args.model, grid, device, resolve_dtype(args.dtype, device) or torch.float32)
    return model, tokenizer, True


def _generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens}).")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    context = context_options(args)
    if args.refusal_threshold is not None and not 0 <= args.refusal_threshold <= 1:
        raise ConfigError(f"--refusal-threshold must lie in [0, 1] (got {args.refusal_threshold}).")
    if not 0 <= args.retokenize < 1:
        raise ConfigError(f"--retokenize must lie in [0, 1) (got {args.retokenize}).")
    model, tokenizer, on_grid = _load(args)
    if on_grid and not is_main_rank():  # every rank decodes the same tokens; one of them prints
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
        sys.stderr = sys.stdout
    flagged = _screen(model, tokenizer, args)
    if len(flagged) == len(args.prompt):
        if args.json:
            print_json({"completions": [{"prompt": p, "text": "", "tokens": 0, "finish_reason": "flagged",
                                         "flagged": flagged[i]} for i, p in enumerate(args.prompt)]})
        return 0
    original = list(args.prompt)
    args.prompt = [p for i, p in enumerate(args.prompt) if i not in flagged]
    prompts = args.prompt
    if args.chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    decisions = None
    table = refusal_table(tokenizer)
    if args.refusal_threshold is not None or args.refusal or (args.chat and table is not None):
        if args.retokenize:
            raise ConfigError("--retokenize does not combine with refusal-token steering yet (this model has refusal "
                              "tokens, or --refusal-threshold was given); drop one of them.")
        decisions = decide_refusals(model, tokenizer, prompts, _thresholds(args, list((table or {}).get("refuse", {}))))
        prompts = [prompt + decision.token for prompt, decision in zip(prompts, decisions, strict=True)]
    streaming = not args.json and len(prompts) == 1

    echoed = []  # the prompt is echoed with the first new text: a refusal before generating leaves stdout empty

    def show(row: int, piece: str) -> None:
        if not echoed:
            echoed.append(sys.stdout.write(args.prompt[0]))
        sys.stdout.write(piece)
        sys.stdout.flush()

    start = time.perf_counter()
    encode = _retokenizer(tokenizer, args, dict(zip(prompts, args.prompt, strict=True)))
    with recurrence_settings(model, args.recurrence, args.exit_kl) as iterations:
        completions = generate_text(model, tokenizer, prompts, args.max_new_tokens, sampling, args.seed, args.stop,
                                    on_text=show if streaming else None, add_special_tokens=not args.chat,
                                    encode=encode, context=context)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in completions)
    if args.json:
        rows = [{"prompt": c.prompt, "text": c.text, "tokens": len(c.token_ids), "finish_reason": c.finish_reason}
                for c in completions]
        for row, decision in zip(rows, decisions or [], strict=False):
            row["refusal"] = {"token": decision.token, "category": decision.category,
                              "respond_probability": decision.respond_probability,
                              "refuse_probabilities": decision.refuse_probabilities}
        rows += [{"prompt": prompt, "text": "", "tokens": 0, "finish_reason": "flagged", "flagged": flagged[i]}
                 for i, prompt in enumerate(original) if i in flagged]
        report = {"completions": rows, "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 2)}
        if iterations:  # a recurrent-depth model: core iterations per forward call (prefill, then one per token)
            report["recurrence"] = {"iterations": iterations, "mean": round(sum(iterations) / len(iterations), 3)}
        print_json(report)
        return 0
    if streaming:
        sys.stdout.write(("" if echoed else args.prompt[0]) + "\n")
        sys.stdout.flush()
    else:
        for completion in completions:
            sys.stdout.write(f"--- {completion.prompt}\n{completion.prompt}{completion.text}\n")
    sys.stderr.write(f"{tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s)\n")
    return 0


def run(args: argparse.Namespace) -> int:
    """Generate, and on a grid leave the process group cleanly (or, after an error on this rank, without waiting)."""
    succeeded = False
    try:
        code = _generate(args)
        succeeded = True
        return code
    finally:
        if torch.distributed.is_initialized():
            stop_distributed(succeeded)
