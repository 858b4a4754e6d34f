"""Refusal-token steering at inference (Jain et al. 2024): one forward pass over the templated prompt gives
p = softmax(logits / T) at the last position; the model refuses with category c when p[refuse_c] >= tau_c (the
most likely such category wins), and without a threshold when a refusal token is more likely than [respond].
The chosen token is appended to the prompt and generation continues from it, so the rate of refusals moves with
tau without any retraining.

Entry point: decide_refusals(model, tokenizer, prompts, thresholds, temperature) -> one RefusalDecision each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tetra.data.refusal import refusal_table
from tetra.data.tokenizer import TextTokenizer
from tetra.errors import ConfigError
from tetra.infer.generate import left_pad
from tetra.model import Transformer


@dataclass
class RefusalDecision:
    """What the first token of a reply will be, and the probabilities behind the choice."""

    token: str  # the token appended to the prompt
    category: str | None  # the refusal category, or None when the model responds
    respond_probability: float
    refuse_probabilities: dict[str, float]  # per category


def check_thresholds(thresholds: dict[str, float], categories: list[str]) -> None:
    """Thresholds must be probabilities, for categories the model was trained with."""
    problems = [f"{name} = {value}" for name, value in thresholds.items() if not 0.0 <= value <= 1.0]
    if problems:
        raise ConfigError(f"Refusal thresholds must lie in [0, 1]; got {', '.join(problems)}.")
    unknown = sorted(set(thresholds) - set(categories))
    if unknown:
        raise ConfigError(f"Unknown refusal categories {', '.join(unknown)}; this model's categories are "
                          f"{', '.join(categories)} (binary refusal tokens have the single category 'refuse').")


@torch.no_grad()
def decide_refusals(model: Transformer, tokenizer: TextTokenizer, prompts: list[str],
                    thresholds: dict[str, float] | None = None, temperature: float = 1.0) -> list[RefusalDecision]:
    """One batched, left-padded forward over the prompts; a decision per prompt."""
    table = refusal_table(tokenizer)
    if table is None:
        raise ConfigError("This model's tokenizer has no refusal tokens (tokenizer_config.json lists none). Train "
                          "on data prepared with `tetra data prepare --refusal-tokens binary|categories` first.")
    thresholds = thresholds or {}
    check_thresholds(thresholds, list(table["refuse"]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    # Templated prompts hold their own special tokens, as in training (prepared with add_special_tokens=False).
    ids, attention = left_pad([tokenizer.encode(prompt, add_special_tokens=False) for prompt in prompts], pad, device)
    logits = model(ids, attention_mask=attention, last_only=True)[:, -1].float()
    probabilities = torch.softmax(logits / max(temperature, 1e-6), dim=-1).cpu()
    decisions = []
    for row in probabilities:
        respond = float(row[table["respond"]])
        refuse = {name: float(row[index]) for name, index in table["refuse"].items()}
        if thresholds:
            passing = {name: p for name, p in refuse.items() if name in thresholds and p >= thresholds[name]}
        else:
            passing = {name: p for name, p in refuse.items() if p >= respond}
        category = max(passing, key=passing.get) if passing else None
        token_id = table["respond"] if category is None else table["refuse"][category]
        decisions.append(RefusalDecision(tokenizer.backend.id_to_token(token_id), category, respond, refuse))
    return decisions
