"""Getting the benchmark answered: by a local model (greedy, through its chat template when it has one, batched)
or by any OpenAI-compatible endpoint (temperature 0, several requests in flight).

Entry points: answer_with_model(model, tokenizer, questions, ...), answer_with_endpoint(url, questions, ...).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tetra.data.tokenizer import TextTokenizer
from tetra.endpoint import chat, first_model
from tetra.infer.sampling import SamplingConfig
from tetra.infer.text import generate_text
from tetra.model import Transformer


def answer_with_model(model: Transformer, tokenizer: TextTokenizer, questions: list[dict], max_new_tokens: int,
                      batch_size: int = 8, on_batch=None) -> dict[str, str]:
    chat_template = bool(tokenizer.chat_template)
    answers = {}
    ordered = sorted(questions, key=lambda q: len(q["prompt"]))  # similar lengths share a batch: less padding
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q["prompt"]}]) if chat_template
                   else q["prompt"] + "\n" for q in batch]
        completions = generate_text(model, tokenizer, prompts, max_new_tokens, SamplingConfig(temperature=0.0),
                                    add_special_tokens=not chat_template)
        answers.update({q["id"]: c.text for q, c in zip(batch, completions, strict=True)})
        if on_batch:
            on_batch(len(answers), len(questions))
    return answers


def answer_with_endpoint(base_url: str, questions: list[dict], max_tokens: int, model: str | None = None,
                         concurrency: int = 8) -> dict[str, str]:
    name = model or first_model(base_url)

    def one(question: dict) -> str:
        choice = chat(base_url, name, [{"role": "user", "content": question["prompt"]}], temperature=0,
                      max_tokens=max_tokens)
        return choice["message"].get("content") or ""

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        return dict(zip((q["id"] for q in questions), pool.map(one, questions), strict=True))
