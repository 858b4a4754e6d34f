"""`tetra defense calibrate`: set the perplexity filter's thresholds from benign prompts at a chosen
false-positive rate, for `tetra generate --perplexity-filter` and `tetra serve --perplexity-filter`.

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
import sys

from tetra.commands.common import add_model_arguments, load_model_and_tokenizer, print_json
from tetra.errors import ConfigError

EXAMPLES = """examples:
  tetra defense calibrate models/smollm2 --benign benign.txt --fpr 0.05 --out models/smollm2-filter.json
  tetra serve models/smollm2 --perplexity-filter models/smollm2-filter.json --retokenize 0.4
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("defense", help="baseline jailbreak defenses (perplexity filter)",
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="defense_command", required=True, metavar="WHAT")
    calibrate = verbs.add_parser("calibrate", help="perplexity-filter thresholds from benign prompts",
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(calibrate)
    calibrate.add_argument("--benign", required=True, help="benign prompts: .txt (one per line) or .jsonl")
    calibrate.add_argument("--fpr", type=float, default=0.05, help="false-positive rate allowed on such prompts")
    calibrate.add_argument("--window", type=int, default=10, help="tokens per sliding window")
    calibrate.add_argument("--out", required=True, help="the filter file to write (JSON)")
    calibrate.add_argument("--json", action="store_true", help="print the thresholds as one JSON object")
    calibrate.set_defaults(handler=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from tetra.eval.defenses import calibrate_filter, flag_rate, read_prompts

    if not 0 < args.fpr < 1:
        raise ConfigError(f"--fpr must lie in (0, 1) (got {args.fpr}).")
    if args.window < 1:
        raise ConfigError(f"--window must be at least 1 (got {args.window}).")
    prompts = read_prompts(args.benign)
    if len(prompts) < 2:
        raise ConfigError(f"{args.benign} holds {len(prompts)} prompt(s); calibration needs at least two (hundreds "
                          "give a threshold worth trusting).")
    model, tokenizer = load_model_and_tokenizer(args)
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    guard = calibrate_filter(model, encoded, args.fpr, args.window)
    guard.save(args.out)
    result = {"whole_threshold": guard.whole_threshold, "window_threshold": guard.window_threshold,
              "window": guard.window, "benign_prompts": len(prompts),
              "flagged_benign": flag_rate(model, guard, encoded), "out": args.out}
    if args.json:
        print_json(result)
    else:
        sys.stdout.write(f"wrote {args.out}: mean NLL > {guard.whole_threshold:.3f} or a {guard.window}-token window "
                         f"> {guard.window_threshold:.3f} is flagged; {100 * result['flagged_benign']:.1f}% of the "
                         f"{len(prompts)} benign prompts are\n")
    return 0
