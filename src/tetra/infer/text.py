"""Text-level generation: encode prompts, generate, stream decoded text, stop at EOS or a stop string.

Entry point: generate_text(model, tokenizer, prompts, ...) -> one Completion per prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tetra.data.tokenizer import TextTokenizer
from tetra.infer.context import ContextOptions
from tetra.infer.generate import generate_ids
from tetra.infer.sampling import SamplingConfig
from tetra.model import Transformer


@dataclass
class Completion:
    """What one prompt produced, and why it stopped: eos, stop (a stop string) or length."""

    prompt: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"


class TextStream:
    """Incremental detokenization for one row: emits only text that is final.

    Text is held back while it ends inside a multi-byte character or could still grow into a stop string.
    """

    def __init__(self, tokenizer: TextTokenizer, stop_strings: list[str]) -> None:
        self.tokenizer, self.stop_strings = tokenizer, stop_strings
        self.holdback = max((len(s) - 1 for s in stop_strings), default=0)
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped_text: str | None = None

    def push(self, token: int) -> str:
        """Add a token; return newly final text ('' if none)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for stop in self.stop_strings:
            index = text.find(stop)
            if index >= 0 and (self.stopped_text is None or index < len(self.stopped_text)):
                self.stopped_text = text[:index]
        if self.stopped_text is not None:
            return self._emit(self.stopped_text, len(self.stopped_text))
        if text.endswith("\ufffd"):
            return ""
        return self._emit(text, len(text) - self.holdback)

    def finish(self) -> str:
        """Everything not yet emitted, at the end of generation."""
        text = self.stopped_text if self.stopped_text is not None else self.tokenizer.decode(self.ids)
        return self._emit(text, len(text))

    def _emit(self, text: str, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece = text[self.emitted:upto]
        self.emitted = upto
        return piece


def generate_text(
    model: Transformer,
    tokenizer: TextTokenizer,
    prompts: list[str],
    max_new_tokens: int = 128,
    sampling: SamplingConfig | None = None,
    seed: int | None = None,
    stop_strings: list[str] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    add_special_tokens: bool = True,
    encode: Callable[..., list[int]] | None = None,
    context: ContextOptions | None = None,
) -> list[Completion]:
    """A completion per prompt (batched, left-padded); on_text(row, piece) receives text as it becomes final.
    add_special_tokens=False for prompts a chat template rendered: they already hold their BOS. encode replaces
    tokenizer.encode (same signature), for a retokenizing defense; context: attention policy, chunked prefill and
    where the KV cache lives."""
    stop_strings = [s for s in (stop_strings or []) if s]
    streams = [TextStream(tokenizer, stop_strings) for _ in prompts]
    eos_ids = sorted(set(model.config.eos_token_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set()))

    def on_step(appended: dict[int, int]) -> set[int]:
        stopped = set()
        for row, token in appended.items():
            if token in eos_ids:
                continue
            piece = streams[row].push(token)
            if piece and on_text:
                on_text(row, piece)
            if streams[row].stopped_text is not None:
                stopped.add(row)
        return stopped

    encode = encode or tokenizer.encode
    encoded = [encode(prompt, add_special_tokens=add_special_tokens) for prompt in prompts]
    outputs = generate_ids(model, encoded, max_new_tokens, sampling, eos_ids, seed, on_step, context)
    completions = []
    for row, (prompt, ids) in enumerate(zip(prompts, outputs, strict=True)):
        stream = streams[row]
        rest = stream.finish()
        if rest and on_text:
            on_text(row, rest)
        reason = "stop" if stream.stopped_text is not None else "eos" if ids and ids[-1] in eos_ids else "length"
        text = stream.stopped_text if stream.stopped_text is not None else tokenizer.decode(ids)
        completions.append(Completion(prompt, text, ids, reason))
    return completions
