"""Long-context quality of the decoding attention policies on SmolLM2-135M-Instruct (8k context): dense attention
against exact top-k, Loki and H2O at budgets of 1-25% of the prompt, on the generated RULER-style tasks at 2k-8k
tokens. The published claim under test: top-k over ~2% of the keys keeps >= 95% of dense accuracy.

Run: python experiments/long_context_quality.py [--smoke] [--work DIR]   (make smollm2 first; ~1 h on 2 cores)
Each sample is prefilled once and decoded greedily under every policy (index-backed top-k with a flat index equals
exact top-k, as tests/test_attention_policies.py checks, so it is not repeated). Loki's basis is calibrated first on
standard-library source text (not on the task text). Writes long_context_quality.md / .json, the accuracy-vs-budget
plot long_context_quality.png and per-policy heatmaps long_context_heatmap.png to --work.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_common import base_model  # noqa: E402

from tetra.data.sources import stdlib_files  # noqa: E402
from tetra.data.tokenizer import TextTokenizer  # noqa: E402
from tetra.eval.longctx.report import format_table, plot_heatmap, summarize  # noqa: E402
from tetra.eval.longctx.runner import evaluate_policies  # noqa: E402
from tetra.eval.longctx.samples import make_samples, parse_lengths  # noqa: E402
from tetra.infer.attention.loki_calibration import calibrate_loki  # noqa: E402
from tetra.infer.attention.policy import AttentionPolicy  # noqa: E402
from tetra.model.io import load_model  # noqa: E402

TASKS = ["needle", "needle_multikey", "needle_multivalue", "needle_distractors", "qa"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="experiments/out/long_context")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model and short tasks (the CI's run)")
    parser.add_argument("--lengths", default=None, help="default 2k,4k,8k (smoke: 384,512)")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--per-task", type=int, default=None, help="default 4 (smoke: 1)")
    parser.add_argument("--budgets", default="0.01,0.02,0.05,0.1,0.25")
    parser.add_argument("--policies", default="topk,loki,h2o")
    parser.add_argument("--recent", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def calibration_sequences(tokenizer: TextTokenizer, length: int, count: int) -> list[list[int]]:
    """`count` windows of `length` tokens of standard-library source."""
    tokens: list[int] = []
    for path in stdlib_files():
        tokens += tokenizer.encode(path.read_text(errors="ignore"))
        if len(tokens) >= length * count:
            break
    return [tokens[i * length : (i + 1) * length] for i in range(count)]


def relative_table(summary: dict, policies: dict[str, tuple[str, float]], budgets: list[float],
                   lengths: list[int]) -> tuple[list[str], dict]:
    """Markdown rows: per policy and budget, mean accuracy over tasks and lengths and its ratio to dense."""
    dense = sum(summary["dense"]["all"][length] for length in lengths) / len(lengths)
    table = {"dense": {"accuracy": dense}}
    lines = ["| policy | " + " | ".join(f"{100 * b:g}%" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets), f"| dense | {100 * dense:.1f} (1.00) |" + " |" * (len(budgets) - 1)]
    for kind in dict.fromkeys(kind for kind, _ in policies.values()):
        cells = []
        for budget in budgets:
            label = next(name for name, (k, b) in policies.items() if k == kind and b == budget)
            accuracy = sum(summary[label]["all"][length] for length in lengths) / len(lengths)
            ratio = accuracy / dense if dense else float("nan")
            table.setdefault(kind, {})[budget] = {"accuracy": accuracy, "of_dense": ratio}
            cells.append(f"{100 * accuracy:.1f} ({ratio:.2f})")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines, table


def plot_budgets(table: dict, budgets: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for kind, per_budget in table.items():
        if kind == "dense":
            continue
        axis.plot([100 * b for b in budgets], [per_budget[b]["of_dense"] for b in budgets], marker="o", label=kind)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.axhline(0.95, color="gray", linestyle="--", linewidth=0.8, label="95% of dense")
    axis.set_xscale("log")
    axis.set_xticks([100 * b for b in budgets], [f"{100 * b:g}%" for b in budgets])
    axis.minorticks_off()
    axis.set_xlabel("budget (% of the prompt's keys attended, plus the recent window)")
    axis.set_ylabel("accuracy / dense accuracy")
    axis.set_title(textwrap.fill(title, 70), fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = base_model(work, args.smoke)
    model, tokenizer = load_model(folder), TextTokenizer.load(folder)
    lengths = parse_lengths(args.lengths or ("384,512" if args.smoke else "2k,4k,8k"))
    per_task = args.per_task or (1 if args.smoke else 4)
    budgets = [float(b) for b in args.budgets.split(",")]
    kinds = [k.strip() for k in args.policies.split(",") if k.strip()]
    recent = min(args.recent, 16) if args.smoke else args.recent
    started = time.perf_counter()
    loki_file = work / "loki.safetensors"
    calibrate_loki(model, calibration_sequences(tokenizer, 512 if args.smoke else 2048, 2 if args.smoke else 8)
                   ).save(loki_file)
    policies: dict[str, AttentionPolicy] = {"dense": AttentionPolicy()}
    labels: dict[str, tuple[str, float]] = {}
    for kind in kinds:
        for budget in budgets:
            policy = AttentionPolicy(kind, budget, recent, loki_path=str(loki_file) if kind == "loki" else None)
            policies[policy.describe()] = policy
            labels[policy.describe()] = (kind, budget)
    samples = make_samples(tokenizer, args.tasks.split(","), lengths, per_task, args.seed)

    def progress(done: int, total: int) -> None:
        print(f"  {done}/{total} samples, {time.perf_counter() - started:.0f} s", flush=True)

    results = evaluate_policies(model, tokenizer, samples, policies, args.prefill_chunk, progress)
    summary = summarize(results)
    lines, table = relative_table(summary, labels, budgets, lengths)
    name = "a tiny random model (smoke)" if args.smoke else "SmolLM2-135M-Instruct"
    title = (f"{name}: {len(args.tasks.split(','))} tasks x {per_task} samples at "
             f"{', '.join(str(n) for n in lengths)} tokens; {recent} recent tokens always attended")
    report = ["# Long-context quality by attention policy and budget\n", title + "\n",
              "Mean accuracy (%) over tasks and lengths, and in parentheses its ratio to dense:\n", *lines, "",
              "Per policy, task and length (accuracy %):\n", "```", format_table(summary), "```",
              f"\n{len(samples)} samples, {time.perf_counter() - started:.0f} s."]
    (work / "long_context_quality.md").write_text("\n".join(report) + "\n")
    (work / "long_context_quality.json").write_text(json.dumps(
        {"summary": summary, "relative": {k: ({str(b): v for b, v in t.items()} if k != "dense" else t)
                                          for k, t in table.items()},
         "results": [r.as_dict() for r in results]}, indent=1))
    plot_budgets(table, budgets, work / "long_context_quality.png", title)
    shown = {label: summary[label] for label in summary
             if label == "dense" or labels.get(label, ("", 0))[1] == budgets[min(1, len(budgets) - 1)]}
    plot_heatmap(shown, work / "long_context_heatmap.png")
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
