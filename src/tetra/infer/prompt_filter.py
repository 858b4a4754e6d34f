"""The perplexity filter (Jain et al.'s baseline jailbreak defense): optimized adversarial suffixes are gibberish to
the model, so a prompt whose mean token NLL, over the whole prompt or over any window of 10 tokens, exceeds what
benign prompts reach is flagged before it is answered.

Entry points: prompt_scores(model, ids, window) -> PromptScores, PerplexityFilter (thresholds, check(), save/load).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tetra.errors import ConfigError
from tetra.infer.logprobs import target_logprobs
from tetra.model import Transformer

WINDOW = 10


@dataclass(frozen=True)
class PromptScores:
    """Mean NLL (nats/token) of the whole prompt and of its worst window."""

    whole: float
    worst_window: float


@torch.inference_mode()
def prompt_scores(model: Transformer, ids: list[int], window: int = WINDOW) -> PromptScores:
    """Score a prompt's tokens (each given those before it; the first is not scored)."""
    if len(ids) < 2:
        return PromptScores(0.0, 0.0)
    device = model.embed.weight.device
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    hidden = model(tokens[:, :-1], hidden_only=True)[0]
    nll = -target_logprobs(model, hidden, tokens[0, 1:])[0]
    worst = nll.mean() if len(nll) <= window else nll.unfold(0, window, 1).mean(dim=-1).max()
    return PromptScores(nll.mean().item(), worst.item())


@dataclass(frozen=True)
class PerplexityFilter:
    """Flag a prompt when either score exceeds its threshold (set from benign prompts by eval.defenses)."""

    whole_threshold: float
    window_threshold: float
    window: int = WINDOW
    false_positive_rate: float = 0.0  # the rate on benign prompts the thresholds were calibrated for

    def check(self, model: Transformer, ids: list[int]) -> PromptScores | None:
        """The scores when the prompt is flagged, None when it passes."""
        scores = prompt_scores(model, ids, self.window)
        flagged = scores.whole > self.whole_threshold or scores.worst_window > self.window_threshold
        return scores if flagged else None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"perplexity_filter": asdict(self)}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PerplexityFilter:
        path = Path(path)
        try:
            values = json.loads(path.read_text())["perplexity_filter"]
            return cls(**values)
        except FileNotFoundError:
            raise ConfigError(f"Perplexity filter file {path} does not exist. Make one with `tetra defense "
                              "calibrate MODEL --benign PROMPTS --out FILE`.") from None
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{path} is not a perplexity filter file ({error}); calibrate it again with "
                              "`tetra defense calibrate`.") from None
