"""Test-time compute with recurrent depth, at CPU scale: a recurrent-depth model trained on a multi-step task (the
running value: a digit carried through 1..4 operations mod 10, short ones more often; mean recurrence 4, gradient
through the last 4 iterations) answers fresh questions of 1..8 operations at test-time r = 1 .. 4x the training
mean, against a plain model with the same blocks (equal parameters) and the same plain model trained for as many
FLOPs as the recurrent one; then adaptive exit: the iterations it saves and the accuracy it keeps.
`--task reachability` runs the graph task instead (it did not learn at this scale; docs/reasoning.md).

The published shape: accuracy grows with test-time r up to and beyond the training mean, most on the hardest
questions. Results go to experiments/out/test_time_compute/ and docs/reasoning.md. Finished trainings are kept and
skipped when the script runs again (delete the folder to start over).

Run: python experiments/test_time_compute.py             (about 25 minutes on 2 CPU cores)
     python experiments/test_time_compute.py --steps 6667 --no-equal-flops   (the recurrent model as long as
                                                          the plain one that learned; about 50 minutes more)
     python experiments/test_time_compute.py --smoke     (a few steps; the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tetra.cli import main as tetra
from tetra.data.tokenizer import TextTokenizer
from tetra.eval.multistep import evaluate_by_hops, task_of
from tetra.infer.recurrence import recurrence_settings
from tetra.model.io import load_model

PRELUDE, CORE, CODA = 1, 2, 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("running-value", "reachability"), default="running-value")
    parser.add_argument("--steps", type=int, default=2500, help="optimizer steps of the recurrent model")
    parser.add_argument("--mean-recurrence", type=int, default=4)
    parser.add_argument("--backprop-depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--nodes", type=int, default=10, help="reachability: nodes per graph (at most 10)")
    parser.add_argument("--edges", type=int, default=12, help="reachability: edges per graph")
    parser.add_argument("--max-hops", type=int, default=4, help="the hardest questions in training")
    parser.add_argument("--samples", type=int, default=100, help="test questions per hop count")
    parser.add_argument("--exit-kl", type=float, default=5e-4)
    parser.add_argument("--no-equal-flops", action="store_true",
                        help="skip the plain model trained for the recurrent one's FLOPs (steps x ~2.7)")
    parser.add_argument("--out", default="experiments/out/test_time_compute")
    parser.add_argument("--smoke", action="store_true")
    return parser.parse_args(argv)


def flop_ratio(mean: int, depth: int) -> float:
    """Training FLOPs per token of the recurrent model over the plain one with the same blocks: forward runs the
    core E[r] = mean + 1 times, backward (twice a forward) only the last `depth` iterations."""
    forward = PRELUDE + CORE * (mean + 1) + CODA
    backward = 2 * (PRELUDE + CORE * depth + CODA)
    return (forward + backward) / (3 * (PRELUDE + CORE + CODA))


def train(out: Path, name: str, steps: int, recurrent: bool, args: argparse.Namespace) -> Path:
    finished = out / name / "checkpoints" / f"step-{steps:07d}"
    if finished.is_dir():  # kept from an earlier invocation
        return finished
    model = (f"recurrent_prelude = {PRELUDE}\nrecurrent_core = {CORE}\nrecurrent_coda = {CODA}\n"
             f"mean_recurrence = {args.mean_recurrence}\nbackprop_depth = {args.backprop_depth}\n") if recurrent else ""
    config = out / f"{name}.toml"
    config.write_text(f'''[data]
path = "{out / 'data'}"
seq_len = 128
[model]
hidden_size = {args.width}
n_layers = {PRELUDE + CORE + CODA}
n_heads = 4
{model}[train]
max_steps = {steps}
batch_size = {args.batch}
lr = {args.lr}
warmup_steps = {max(1, steps // 20)}
weight_decay = 0.0
precision = "fp32"
seed = 0
[eval]
every = 0
[run]
dir = "{out / name}"
log_every = {max(1, steps // 10)}
checkpoint_every = 0
''')
    if tetra(["train", str(config), "--no-progress"]) != 0:
        raise SystemExit(f"training {name} failed")
    return sorted((out / name / "checkpoints").iterdir())[-1]


def accuracy(checkpoint: Path, hops: list[int], samples: int, steps: int | None = None,
             exit_kl: float = 0.0) -> tuple[dict[int, float], float | None]:
    model = load_model(checkpoint)
    tokenizer = TextTokenizer.load(checkpoint)
    with recurrence_settings(model, steps, exit_kl) as iterations:
        result = evaluate_by_hops(model, tokenizer, task_of(tokenizer), hops, samples, seed=11)
    return result, (sum(iterations) / len(iterations) if iterations else None)


def plot(curves: dict[str, dict[int, float]], baselines: dict[str, float], mean: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for label, by_r in curves.items():
        axis.plot(list(by_r), list(by_r.values()), marker="o", label=f"recurrent, {label}")
    for (label, value), style in zip(baselines.items(), ("--", ":"), strict=False):
        axis.axhline(value, linestyle=style, color="grey", label=label)
    axis.axvline(mean, color="black", linewidth=0.8)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("test-time recurrence r")
    axis.set_ylabel("accuracy")
    axis.set_ylim(-0.02, 1.02)
    axis.legend(fontsize=8)
    axis.set_title("accuracy against test-time compute")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.steps, args.width, args.samples, args.mean_recurrence, args.backprop_depth = 3, 32, 2, 2, 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    examples = max(1000, args.steps * args.batch * 4)
    task = ["reachability", "--nodes", str(args.nodes), "--edges", str(args.edges)] \
        if args.task == "reachability" else ["running-value"]
    if not (out / "data").is_dir() and tetra(["data", *task, "--max-hops", str(args.max_hops), "--examples",
                                              str(examples), "--out", str(out / "data"), "--val-fraction", "0"]):
        raise SystemExit(f"could not write the {args.task} data")
    ratio = flop_ratio(args.mean_recurrence, args.backprop_depth)
    # Runs are named by kind and steps, so a longer study reuses any run of the same length (the equal-FLOPs plain
    # model of a 2,500-step study is the equal-parameters one of a 6,667-step study).
    checkpoints = {"recurrent": train(out, f"recurrent_{args.steps}", args.steps, True, args),
                   "plain, equal parameters": train(out, f"plain_{args.steps}", args.steps, False, args)}
    if not args.no_equal_flops:
        flops_steps = round(args.steps * ratio)
        checkpoints["plain, equal training FLOPs"] = train(out, f"plain_{flops_steps}", flops_steps, False, args)
    if args.task == "reachability":  # up to two hop counts harder than in training
        hops = list(range(0, min(args.max_hops + 3, args.nodes)))
    else:  # up to twice the training's longest question
        hops = list(range(1, 2 * args.max_hops + 1))
    recurrences = [r for r in (1, 2, 4, 8, 16, 32) if r <= 4 * args.mean_recurrence]
    table: dict[str, dict] = {}
    for r in recurrences:
        table[f"r = {r}"], _ = accuracy(checkpoints["recurrent"], hops, args.samples, r)
    adaptive, iterations = accuracy(checkpoints["recurrent"], hops, args.samples, 4 * args.mean_recurrence,
                                    args.exit_kl)
    table[f"adaptive exit (KL < {args.exit_kl:g}, r <= {4 * args.mean_recurrence})"] = adaptive
    baseline_names = [name for name in checkpoints if name.startswith("plain")]
    for name in baseline_names:
        table[name], _ = accuracy(checkpoints[name], hops, args.samples)
    lines = ["| model | " + " | ".join(f"{h} hops" if h else "unreachable" for h in hops) + " | mean |",
             "| --- |" + " ---: |" * (len(hops) + 1)]
    for name, by_hops in table.items():
        mean = sum(by_hops.values()) / len(by_hops)
        lines.append(f"| {name} | " + " | ".join(f"{100 * by_hops[h]:.0f}%" for h in hops) + f" | {100 * mean:.1f}% |")
    flops_note = "" if args.no_equal_flops else \
        f", the plain equal-FLOPs one {round(args.steps * ratio)} ({ratio:.2f}x)"
    text = "\n".join(lines) + f"\n\nadaptive exit ran {iterations:.2f} core iterations per forward call on average " \
        f"(fixed: {4 * args.mean_recurrence}); all models trained {args.steps} steps{flops_note}\n"
    print(text)
    (out / f"table_{args.steps}.md").write_text(text, encoding="utf-8")
    (out / f"results_{args.steps}.json").write_text(json.dumps({"args": vars(args), "accuracy": table,
                                                               "adaptive_iterations": iterations,
                                                               "flop_ratio": ratio}, indent=1))
    hardest = [h for h in hops if h > 0]
    curve = {r: sum(table[f"r = {r}"][h] for h in hardest) / len(hardest) for r in recurrences}
    baselines = {name: sum(table[name][h] for h in hardest) / len(hardest) for name in baseline_names}
    plot({"mean over hop counts": curve}, baselines, args.mean_recurrence, out / f"test_time_compute_{args.steps}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
