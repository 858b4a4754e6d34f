"""Accuracy on fresh multi-step reasoning questions (graph reachability, running value) by hop count: one greedy
answer token per question, exact match, so a model's accuracy can be read against how many steps a question takes
and, for a recurrent-depth model, against its test-time iterations.

Entry points: task_of(tokenizer), evaluate_by_hops(model, tokenizer, task, hops, samples, ...).
"""

from __future__ import annotations

import random

import torch

from tetra.data.reachability import TASK_KEY as REACHABILITY_KEY
from tetra.data.reachability import ReachabilityTask
from tetra.data.running_value import TASK_KEY as RUNNING_KEY
from tetra.data.running_value import RunningValueTask
from tetra.data.tokenizer import TextTokenizer
from tetra.errors import ConfigError
from tetra.infer.generate import generate_ids
from tetra.model import Transformer

MultiStepTask = ReachabilityTask | RunningValueTask
TASKS = {REACHABILITY_KEY: ReachabilityTask, RUNNING_KEY: RunningValueTask}


def task_of(tokenizer: TextTokenizer) -> MultiStepTask:
    """The task a checkpoint was trained on, as its tokenizer recorded it."""
    for key, kind in TASKS.items():
        recorded = tokenizer.extra_config.get(key)
        if isinstance(recorded, dict):
            return kind(**recorded)
    raise ConfigError("This model's tokenizer records no multi-step task (tokenizer_config.json has neither "
                      f"{REACHABILITY_KEY!r} nor {RUNNING_KEY!r}); evaluate a checkpoint trained on `tetra data "
                      "reachability` or `tetra data running-value` data.")


def evaluate_by_hops(model: Transformer, tokenizer: TextTokenizer, task: MultiStepTask, hops: list[int],
                     samples: int, seed: int = 0, batch_size: int = 64) -> dict[int, float]:
    """{hops: accuracy} over `samples` questions at each hop count (hops above the training maximum are fine: a
    harder test; they must lie in the task's hop range)."""
    low, high = task.hop_range()
    if any(not low <= h <= high for h in hops):
        raise ConfigError(f"--hops must lie in {low}..{high} for this task (got {hops}).")
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
