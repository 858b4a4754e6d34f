"""Refusal tokens on SmolLM2-135M-Instruct: fine-tune (LoRA) on questions about real standard-library functions
(answered by their docstrings) and about made-up ones (refused), every reply marked [respond] or [refuse]; then, on
held-out prompts of both kinds, sweep the threshold tau of `tetra generate --refusal-threshold` and record how often
each kind is refused. No retraining between thresholds. Results: docs/finetuning.md.

Run: python experiments/refusal_tokens.py            (about 12 minutes on 2 CPU cores; needs `make smollm2`)
     python experiments/refusal_tokens.py --smoke    (a tiny random model, a minute; the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sft_common import base_model, held_out, lora_run, prepare  # noqa: E402

from tetra.adapters.peft_io import load_model_with_adapter  # noqa: E402
from tetra.data.stdlib_qa import stdlib_qa_records  # noqa: E402
from tetra.data.tokenizer import TextTokenizer  # noqa: E402
from tetra.infer.refusal import decide_refusals  # noqa: E402

THRESHOLDS = [0.0, 0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0]


def sweep(checkpoint: Path, prompts: dict[str, list[str]]) -> list[dict]:
    """Refusal rate per prompt kind at every threshold, from one forward pass per prompt."""
    model = load_model_with_adapter(checkpoint)
    tokenizer = TextTokenizer.load(checkpoint)
    rendered = {kind: [tokenizer.apply_chat_template([{"role": "user", "content": text}]) for text in texts]
                for kind, texts in prompts.items()}
    probabilities = {kind: [d.refuse_probabilities["refuse"] for d in decide_refusals(model, tokenizer, texts)]
                     for kind, texts in rendered.items()}
    rows = []
    for tau in THRESHOLDS:
        rates = {kind: sum(p >= tau for p in values) / len(values) for kind, values in probabilities.items()}
        rows.append({"tau": tau, "made_up_refused": rates["made_up"], "real_refused": rates["real"]})
    default = {kind: [d.category is not None for d in decide_refusals(model, tokenizer, texts)]
               for kind, texts in rendered.items()}
    rows.append({"tau": None, "made_up_refused": sum(default["made_up"]) / len(default["made_up"]),
                 "real_refused": sum(default["real"]) / len(default["real"])})
    return rows


def write_results(work: Path, rows: list[dict], smoke: bool) -> None:
    lines = ["| tau | made-up prompts refused (TPR) | real prompts refused (FPR) |", "| ---: | ---: | ---: |"]
    for row in rows:
        tau = "none (refuse iff p[refuse] >= p[respond])" if row["tau"] is None else f"{row['tau']:g}"
        lines.append(f"| {tau} | {row['made_up_refused']:.1%} | {row['real_refused']:.1%} |")
    (work / "refusal_results.md").write_text("\n".join(lines) + "\n")
    (work / "refusal_results.json").write_text(json.dumps(rows, indent=2))
    swept = [row for row in rows if row["tau"] is not None]
    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.plot([r["real_refused"] for r in swept], [r["made_up_refused"] for r in swept], marker="o")
    for row in swept[1::3]:
        axis.annotate(f"{row['tau']:g}", (row["real_refused"], row["made_up_refused"]), fontsize=7)
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axis.set(xlabel="real prompts refused (FPR)", ylabel="made-up prompts refused (TPR)",
             title="Refusal tokens: sweeping tau" + (" (smoke)" if smoke else ""))
    figure.tight_layout()
    figure.savefig(work / "refusal_tokens.png", dpi=120)
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--work", default=str(Path(__file__).resolve().parent / "out" / "refusal_tokens"))
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    records = stdlib_qa_records(120 if args.smoke else 800, made_up_fraction=0.35, seed=0)
    base = base_model(work, args.smoke)
    data = prepare(work, "refusal-data", base, records, refusal=True)
    checkpoint = lora_run(work, "refusal", base, data, 4 if args.smoke else args.steps, args.smoke)
    evaluation = held_out(records)
    prompts = {"made_up": [r["messages"][0]["content"] for r in evaluation if "refusal_category" in r],
               "real": [r["messages"][0]["content"] for r in evaluation if "refusal_category" not in r]}
    rows = sweep(checkpoint, prompts)
    write_results(work, rows, args.smoke)
    print(f"held-out prompts: {len(prompts['made_up'])} made-up, {len(prompts['real'])} real")
    return 0


if __name__ == "__main__":
    sys.exit(main())
