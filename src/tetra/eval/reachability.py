"""Accuracy on fresh reachability questions by hop count (0 = unreachable): one greedy answer token each, exact.

Entry points: task_of(tokenizer), evaluate_reachability(model, tokenizer, task, hops, samples, ...).
"""

from __future__ import annotations

import random

import torch

from tetra.data.reachability import TASK_KEY, ReachabilityTask
from tetra.data.tokenizer import TextTokenizer
from tetra.errors import ConfigError
from tetra.infer.generate import generate_ids
from tetra.model import Transformer


def task_of(tokenizer: TextTokenizer) -> ReachabilityTask:
    recorded = tokenizer.extra_config.get(TASK_KEY)
    if not isinstance(recorded, dict):
        raise ConfigError("This model's tokenizer records no reachability task (tokenizer_config.json has no "
                          f"{TASK_KEY!r}); evaluate a checkpoint trained on `tetra data reachability` data.")
    return ReachabilityTask(**recorded)


def evaluate_reachability(model: Transformer, tokenizer: TextTokenizer, task: ReachabilityTask, hops: list[int],
                          samples: int, seed: int = 0, batch_size: int = 64) -> dict[int, float]:
    """{hops: accuracy} over `samples` questions at each hop count (hops above the task's max are fine: a harder
    test; they must stay below the node count)."""
    if any(not 0 <= h < task.nodes for h in hops):
        raise ConfigError(f"--hops must lie in 0..{task.nodes - 1} for graphs of {task.nodes} nodes (got {hops}).")
    rng = random.Random(seed)
    problems = [task.problem(rng, h) for h in hops for _ in range(samples)]
    correct = dict.fromkeys(hops, 0)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            prompts = [tokenizer.encode(prompt, add_special_tokens=False) for prompt, _, _ in chunk]
            outputs = generate_ids(model, prompts, 1)
            for (_, answer, h), output in zip(chunk, outputs, strict=True):
                correct[h] += int(tokenizer.decode(output, skip_special_tokens=True) == answer)
    return {h: correct[h] / samples for h in hops}
