"""NEFTune on SmolLM2-135M-Instruct: the same LoRA fine-tuning on stdlib-qa with noisy embeddings, alpha in
{0, 5, 10}; reports the held-out loss on assistant tokens and the mean length of greedy answers to held-out
questions (the published effect: longer answers that judges prefer), and the length-controlled and raw win rates
of alpha 5 and 10 over alpha 0, judged in both orders by the base model served in the background (the same path as
`tetra eval winrate --judge BASE`). Results: docs/finetuning.md.

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
from tetra.eval.judge import EndpointJudge
from tetra.eval.winrate import judge_pairs, win_rates
from tetra.infer.sampling import SamplingConfig
from tetra.infer.text import generate_text
from tetra.model.io import load_model
from tetra.serve.listen import BackgroundServer
from tetra.serve.server import Server

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


def judged_win_rates(judge_model: Path, questions: list[str], answers: dict[float, list[str]]) -> dict[float, dict]:
    """Win rates of every alpha's answers over alpha 0's, with the judge served on a background thread."""
    server = Server(load_model(judge_model), TextTokenizer.load(judge_model), "judge", max_batch_size=8)
    results = {}
    with BackgroundServer(server) as url:
        judge = EndpointJudge(url + "/v1", "judge")
        for alpha in ALPHAS[1:]:
            pairs = list(zip(questions, answers[alpha], answers[0.0], strict=True))
            annotations = judge_pairs(judge.first_is_better, pairs, concurrency=8)
            rates = win_rates(annotations)
            results[alpha] = {**rates.as_dict(),
                              "position_bias": sum(a.position_bias for a in annotations) / len(annotations)}
    return results


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
    rows, answers_by_alpha = [], {}
    for alpha in ALPHAS:
        checkpoint = lora_run(work, f"alpha-{alpha:g}", base, data, 4 if args.smoke else args.steps, args.smoke,
                              f"train.neftune.alpha={alpha}")
        length, answers = answer_lengths(checkpoint, questions, 16 if args.smoke else 96)
        answers_by_alpha[alpha] = answers
        (work / f"answers-alpha-{alpha:g}.jsonl").write_text("".join(
            json.dumps({"instruction": q, "output": a}) + "\n" for q, a in zip(questions, answers, strict=True)))
        rows.append({"alpha": alpha, "held_out_loss": final_val_loss(checkpoint), "mean_answer_tokens": length,
                     "example": answers[0]})
    rates = judged_win_rates(base, questions, answers_by_alpha)
    for row in rows:
        row["win_rate_vs_alpha_0"] = rates.get(row["alpha"])
    lines = [f"| alpha | held-out loss (assistant tokens) | mean greedy answer length (tokens; reference "
             f"answers: {reference_length:.1f}) | LC win rate vs alpha 0 | raw win rate vs alpha 0 |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        rate = r["win_rate_vs_alpha_0"]
        lc = f"{rate['lc_win_rate']:.1f} ± {rate['lc_standard_error']:.1f}" if rate else "-"
        raw = f"{rate['raw_win_rate']:.1f} ± {rate['raw_standard_error']:.1f}" if rate else "-"
        lines.append(f"| {r['alpha']:g} | {r['held_out_loss']:.4f} | {r['mean_answer_tokens']:.1f} | {lc} | {raw} |")
    (work / "neftune_results.md").write_text("\n".join(lines) + "\n")
    (work / "neftune_results.json").write_text(json.dumps({"rows": rows, "questions": questions,
                                                           "reference_tokens": reference_length}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
