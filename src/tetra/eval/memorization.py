"""Extractable memorization: prompt a model with a document's prefix, greedily decode as many tokens as the held-back
suffix, and compare (exact match, RougeL, longest matching prefix), as in the goldfish-loss paper.

Entry points: measure_memorization(model, documents, ...) -> MemorizationReport; plot_histogram(report, path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tetra.errors import DataError
from tetra.infer.generate import generate_ids, left_pad
from tetra.model import Transformer


def longest_matching_prefix(generated: list[int], reference: list[int]) -> int:
    """How many leading tokens of the generation equal the reference."""
    for index, (a, b) in enumerate(zip(generated, reference, strict=False)):
        if a != b:
            return index
    return min(len(generated), len(reference))


def rouge_l(generated: list[int], reference: list[int]) -> float:
    """RougeL F1 over tokens: from the longest common subsequence (order kept, gaps allowed)."""
    if not generated or not reference:
        return 0.0
    previous = [0] * (len(reference) + 1)
    for token in generated:  # one row of the LCS table at a time
        current = [0]
        for column, expected in enumerate(reference):
            current.append(previous[column] + 1 if token == expected else max(previous[column + 1], current[column]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(generated), common / len(reference)
    return 2 * precision * recall / (precision + recall)


@dataclass
class DocumentResult:
    """One document: how much of its suffix the model reproduced."""

    prefix_tokens: int
    exact_match: bool
    rouge_l: float
    longest_match: int  # leading suffix tokens reproduced exactly
    suffix_loss: float  # mean next-token loss on the suffix given the prefix (teacher-forced): lower = more familiar


@dataclass
class MemorizationReport:
    """Summary over the documents long enough to measure."""

    suffix_tokens: int
    documents: int
    skipped: int  # too short for a prefix plus the suffix
    exact_match_rate: float
    mean_rouge_l: float
    mean_longest_match: float
    mean_suffix_loss: float
    histogram: list[int]  # documents per longest-match length 0..suffix_tokens
    results: list[DocumentResult] = field(repr=False)

    def summary(self) -> dict:
        values = dict(vars(self))
        values.pop("results")
        return values


def split_document(ids: list[int], suffix_tokens: int, max_prefix_tokens: int) -> tuple[list[int], list[int]] | None:
    """(prefix, suffix): the last suffix_tokens tokens, and at most max_prefix_tokens before them; None if too short."""
    if len(ids) < suffix_tokens + 1:
        return None
    prefix = ids[:-suffix_tokens]
    return prefix[-max_prefix_tokens:], ids[-suffix_tokens:]


@torch.inference_mode()
def suffix_losses(model: Transformer, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """Mean cross-entropy of each suffix given its prefix, in one left-padded forward pass."""
    device = model.embed.weight.device
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids, mask = left_pad([prefix + suffix for prefix, suffix in pairs], pad_id, device)
    logits = model(ids[:, :-1], attention_mask=None if mask is None else mask[:, :-1])
    length = len(pairs[0][1])
    losses = F.cross_entropy(logits[:, -length:].float().transpose(1, 2), ids[:, -length:], reduction="none")
    return losses.mean(dim=1).tolist()


def measure_memorization(model: Transformer, documents: list[list[int]], suffix_tokens: int = 50,
                         max_prefix_tokens: int = 2048, batch_size: int = 32) -> MemorizationReport:
    """Greedy extraction of every document's suffix, in batches of similar prefix length (little padding)."""
    max_prefix_tokens = min(max_prefix_tokens, model.config.max_position_embeddings - suffix_tokens)
    if max_prefix_tokens < 1:
        raise DataError(f"--suffix-tokens {suffix_tokens} leaves no room for a prefix in this model's "
                        f"{model.config.max_position_embeddings} positions. Lower --suffix-tokens.")
    pairs = [pair for ids in documents if (pair := split_document(ids, suffix_tokens, max_prefix_tokens))]
    if not pairs:
        raise DataError(f"No document has more than {suffix_tokens} tokens, so none has a prefix to prompt with. "
                        "Pass longer documents or lower --suffix-tokens.")
    order = sorted(range(len(pairs)), key=lambda index: len(pairs[index][0]))
    results: list[DocumentResult | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outputs = generate_ids(model, [pairs[index][0] for index in chunk], suffix_tokens)
        losses = suffix_losses(model, [pairs[index] for index in chunk])
        for index, generated, loss in zip(chunk, outputs, losses, strict=True):
            prefix, suffix = pairs[index]
            longest = longest_matching_prefix(generated, suffix)
            results[index] = DocumentResult(len(prefix), longest == suffix_tokens, rouge_l(generated, suffix), longest,
                                            loss)
    done = [result for result in results if result is not None]
    histogram = np.bincount([r.longest_match for r in done], minlength=suffix_tokens + 1).tolist()
    return MemorizationReport(
        suffix_tokens=suffix_tokens, documents=len(done), skipped=len(documents) - len(done),
        exact_match_rate=float(np.mean([r.exact_match for r in done])),
        mean_rouge_l=float(np.mean([r.rouge_l for r in done])),
        mean_longest_match=float(np.mean([r.longest_match for r in done])),
        mean_suffix_loss=float(np.mean([r.suffix_loss for r in done])), histogram=histogram, results=done)


def plot_histogram(reports: dict[str, MemorizationReport], out: Path) -> Path:
    """Bars of documents per longest-matching-prefix length, one series per labelled report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    width = 0.8 / len(reports)
    for number, (label, report) in enumerate(reports.items()):
        lengths = np.arange(len(report.histogram)) + (number - (len(reports) - 1) / 2) * width
        share = np.asarray(report.histogram) / max(report.documents, 1)
        axis.bar(lengths, share, width=width, label=f"{label} (exact {report.exact_match_rate:.0%})")
    axis.set_xlabel(f"longest matching prefix of the {next(iter(reports.values())).suffix_tokens}-token suffix "
                    "(tokens)")
    axis.set_ylabel("share of documents")
    axis.grid(alpha=0.3, axis="y")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return out
