"""Scoring the long-context samples under several attention policies with one prefill per sample.

Entry points: evaluate_policies(model, tokenizer, samples, policies, chunk) -> [SampleResult], check_context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tetra.data.tokenizer import TextTokenizer
from tetra.errors import ConfigError
from tetra.eval.longctx.samples import LongSample
from tetra.eval.longctx.tasks import TASKS
from tetra.infer.attention.policy import AttentionPolicy
from tetra.infer.attention.shared_prefill import SharedPrefill
from tetra.model import KVCache, Transformer


@dataclass(frozen=True)
class SampleResult:
    task: str
    length: int
    index: int
    policy: str
    score: float
    output: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def check_context(model: Transformer, lengths: list[int]) -> None:
    """Refuse lengths past what the model's positions cover."""
    limit = model.config.max_position_embeddings
    too_long = [length for length in lengths if length > limit]
    if too_long:
        raise ConfigError(f"This model's context is {limit} tokens (max_position_embeddings), so task lengths "
                          f"{', '.join(map(str, too_long))} cannot be evaluated; use --lengths up to {limit}.")


@torch.inference_mode()
def greedy_decode(model: Transformer, cache: KVCache, logits: torch.Tensor, start: int, max_new_tokens: int,
                  eos_ids: set[int]) -> list[int]:
    """Greedy tokens after a prefilled prompt of `start` tokens whose last logits are given."""
    device = model.embed.weight.device
    tokens: list[int] = []
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        tokens.append(token)
        if token in eos_ids or step == max_new_tokens - 1:
            break
        logits = model(torch.tensor([[token]], device=device), kv_cache=cache, cache_start=start + step,
                       last_only=True)[0, -1]
    return tokens


def evaluate_policies(model: Transformer, tokenizer: TextTokenizer, samples: list[LongSample],
                      policies: dict[str, AttentionPolicy], chunk: int = 0,
                      progress: Callable[[int, int], None] | None = None) -> list[SampleResult]:
    """Each sample answered under each policy (label -> policy), greedily."""
    check_context(model, sorted({sample.length for sample in samples}))
    eos_ids = set(model.config.eos_token_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
    record_mass = any(policy.kind == "h2o" for policy in policies.values())
    device = model.embed.weight.device
    results = []
    for done, sample in enumerate(samples):
        ids = torch.tensor([sample.prompt_ids], device=device)
        shared = SharedPrefill(model, ids, sample.max_new_tokens, chunk, record_mass)
        for label, policy in policies.items():
            cache = shared.fork(policy)
            tokens = greedy_decode(model, cache, shared.logits, len(sample.prompt_ids), sample.max_new_tokens,
                                   eos_ids)
            output = tokenizer.decode([t for t in tokens if t not in eos_ids])
            results.append(SampleResult(sample.task, sample.length, sample.index, label,
                                        TASKS[sample.task].score(output, sample.answers), output))
            del cache
        if progress:
            progress(done + 1, len(samples))
    return results
