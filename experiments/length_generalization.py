"""Length generalization in addition (the abacus paper's central effect, at CPU scale): the same small model trained
on reversed addition with operands of up to D digits, with abacus, rotary or no positions, at equal compute (same
shape, steps, batch and data); then exact-match accuracy on fresh problems with operands of 1 .. 5D digits. A fourth
scheme, abacus+loop, is the paper's looped transformer: one block applied L times (L = the others' depth, so the
same forward compute) with input injection, trained with the progressive loss (alpha 0.5), which adds a second,
shorter forward and backward per step.

The published shape: abacus stays accurate far beyond D (most with looping), the baselines collapse right after
D. Results (a table and a plot of accuracy against operand length) go to experiments/out/length_generalization/
and docs/reasoning.md.

Run: python experiments/length_generalization.py                (D = 5, about 50 minutes on 2 CPU cores)
     python experiments/length_generalization.py --digits 10 --steps 6000    (closer to the paper; hours on CPU)
     python experiments/length_generalization.py --smoke        (a few steps; the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tetra.cli import main as tetra
from tetra.data.tokenizer import TextTokenizer
from tetra.eval.arithmetic import evaluate_arithmetic, task_of
from tetra.model.io import load_model

POSITIONS = ("abacus", "rope", "none", "abacus+loop")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", type=int, default=5, help="D: the longest operand in training")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=30, help="test problems per operand length")
    parser.add_argument("--max-offset", type=int, default=None,
                        help="abacus: the training offset's range (default 4D, so the test lengths' places are "
                             "trained; the paper's 99 suits its 20-digit, day-long training)")
    parser.add_argument("--positions", default=",".join(POSITIONS),
                        help="which schemes to (re)train (abacus, rope, none, abacus+loop); the others' results "
                             "are kept from results.json")
    parser.add_argument("--out", default="experiments/out/length_generalization")
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check the script runs")
    return parser.parse_args(argv)


def train(out: Path, scheme: str, args: argparse.Namespace) -> Path:
    """One run folder per scheme; returns its final checkpoint."""
    seq = 16 * (args.digits + 2)
    positions, looped = scheme.removesuffix("+loop"), scheme.endswith("+loop")
    blocks = f"n_layers = 1\nloop = {args.layers}" if looped else f"n_layers = {args.layers}"
    progressive = "progressive_loss = 0.5\n" if looped else ""
    config = out / f"{scheme}.toml"
    config.write_text(f'''[data]
path = "{out / 'data'}"
seq_len = {seq}
[model]
hidden_size = {args.width}
{blocks}
n_heads = 4
positions = "{positions}"
max_position_embeddings = {8 * seq}
abacus_max_offset = {args.max_offset if args.max_offset is not None else 4 * args.digits}
[train]
max_steps = {args.steps}
batch_size = {args.batch}
lr = 2e-3
warmup_steps = {max(1, args.steps // 20)}
weight_decay = 0.0
precision = "fp32"
seed = 0
{progressive}[eval]
every = 0
[run]
dir = "{out / scheme}"
log_every = {max(1, args.steps // 10)}
checkpoint_every = 0
''')
    if tetra(["train", str(config), "--no-progress"]) != 0:
        raise SystemExit(f"training the {scheme} scheme failed")
    return sorted((out / scheme / "checkpoints").iterdir())[-1]


def plot(results: dict[str, dict[int, float]], digits: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for positions, by_length in results.items():
        axis.plot(list(by_length), list(by_length.values()), marker="o", label=positions)
    axis.axvline(digits + 0.5, color="grey", linestyle="--", linewidth=1)
    axis.text(digits + 0.7, 0.9, "longest in training", color="grey")
    axis.set_xlabel("digits per operand")
    axis.set_ylabel("exact-match accuracy")
    axis.set_ylim(-0.02, 1.02)
    axis.legend()
    axis.set_title(f"reversed addition, trained on 1-{digits} digits")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.digits, args.steps, args.width, args.layers, args.samples = 3, 4, 32, 1, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    examples = max(1000, args.steps * args.batch * 16 // 2)
    if tetra(["data", "arithmetic", "--op", "add", "--max-digits", str(args.digits), "--examples", str(examples),
              "--out", str(out / "data"), "--overwrite", "--val-fraction", "0", "--seed", "0"]) != 0:
        raise SystemExit("could not write the addition data")  # the same data every time (seeded)
    lengths = list(range(1, 5 * args.digits + 1))
    results: dict[str, dict[int, float]] = {}
    if (out / "results.json").is_file():  # earlier runs of the schemes not retrained now
        earlier = json.loads((out / "results.json").read_text())["accuracy"]
        results = {name: {int(k): v for k, v in by_length.items()} for name, by_length in earlier.items()}
    for positions in args.positions.split(","):
        checkpoint = train(out, positions, args)
        tokenizer = TextTokenizer.load(checkpoint)
        result = evaluate_arithmetic(load_model(checkpoint), tokenizer, task_of(tokenizer), lengths, args.samples,
                                     seed=7, pairs="diagonal")
        results[positions] = result.by_length()
    schemes = [name for name in POSITIONS if name in results]
    lines = ["| digits per operand | " + " | ".join(schemes) + " |", "| ---: |" + " ---: |" * len(schemes)]
    for length in lengths:
        lines.append(f"| {length} | " + " | ".join(f"{100 * results[p][length]:.0f}%" for p in schemes) + " |")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "accuracy": results}, indent=1))
    (out / f"args-{'-'.join(args.positions.split(','))}.json").write_text(json.dumps(vars(args), indent=1))
    plot(results, args.digits, out / "length_generalization.png")
    print(f"wrote {out / 'length_generalization.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
