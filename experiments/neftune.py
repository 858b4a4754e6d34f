"""NEFTune on SmolLM2-135M-Instruct: the same LoRA fine-tuning on stdlib-qa with noisy embeddings, alpha in
{0, 5, 10}; reports the held-out loss on assistant tokens and the mean length of greedy answers to held-out
questions (the published effect: longer answers that judges prefer). No win rate yet: `tetra eval winrate` does not
exist. Results: docs/finetuning.md.

Run: python experiments/neftune.py            (about 30 minutes on 2 CPU cores; needs `make smollm2`)
     python experiments/neftune.py --smoke    (a tiny random model, a minute; the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sft_common import base_model, final_val_loss, held_out, lora_run, prepare

from tetra.adapters.peft_io import load_model_with_adapter
from tetra.data.stdlib_qa import stdlib_qa_records
from tetra.data.tokenizer import TextTokenizer
from tetra.infer.sampling import SamplingConfig
from tetra.infer.text import generate_text

ALPHAS = (0.0, 5.0, 10.0)


def answer_lengths(checkpoint: Path, questions: list[str], max_new_tokens: int) -> tuple[float, list[str]]:
    """Mean greedy answer length in tokens, and the answers."""
    model = load_model_with_adapter(checkpoint)
    tokenizer = TextTokenizer.load(checkpoint)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    completions = []
    for start in range(0, len(prompts), 8):
        completions += generate_text(model, tokenizer, prompts[start:start + 8], max_new_tokens,
                                     SamplingConfig(temperature=0.0))
    return sum(len(c.token_ids) for c in completions) / len(completions), [c.text for c in completions]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--work", default=str(Path(__file__).resolve().parent / "out" / "neftune"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--questions", type=int, default=40)
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    records = stdlib_qa_records(120 if args.smoke else 800, seed=0)
    base = base_model(work, args.smoke)
    data = prepare(work, "neftune-data", base, records)
    questions = [r["messages"][0]["content"] for r in held_out(records)][: 6 if args.smoke else args.questions]
    references = [r["messages"][1]["content"] for r in held_out(records)][: len(questions)]
    tokenizer = TextTokenizer.load(base)
    reference_length = sum(len(tokenizer.encode(text)) for text in references) / len(references)
    rows = []
    for alpha in ALPHAS:
        checkpoint = lora_run(work, f"alpha-{alpha:g}", base, data, 4 if args.smoke else args.steps, args.smoke,
                              f"train.neftune.alpha={alpha}")
        length, answers = answer_lengths(checkpoint, questions, 16 if args.smoke else 96)
        rows.append({"alpha": alpha, "held_out_loss": final_val_loss(checkpoint), "mean_answer_tokens": length,
                     "example": answers[0]})
    lines = [f"| alpha | held-out loss (assistant tokens) | mean greedy answer length (tokens; reference "
             f"answers: {reference_length:.1f}) |", "| ---: | ---: | ---: |"]
    lines += [f"| {r['alpha']:g} | {r['held_out_loss']:.4f} | {r['mean_answer_tokens']:.1f} |" for r in rows]
    (work / "neftune_results.md").write_text("\n".join(lines) + "\n")
    (work / "neftune_results.json").write_text(json.dumps({"rows": rows, "questions": questions,
                                                           "reference_tokens": reference_length}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
