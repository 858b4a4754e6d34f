"""From engine callbacks (on the engine's thread) to events on the server's asyncio loop, with text decoded
incrementally and stop strings applied.

Entry points: ChoiceEvent, ChoiceSink (one per generated choice; all choices of a request share one queue).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tetra.data.tokenizer import TextTokenizer
from tetra.infer.logprobs import TokenLogprob
from tetra.infer.text import TextStream


@dataclass
class ChoiceEvent:
    """kind 'prompt' (prompt logprobs), 'token' (one token and the text it made final) or 'end'."""

    index: int
    kind: str
    token_id: int = -1
    text: str = ""
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None


class ChoiceSink:
    """The engine's TokenSink for one choice: pushes ChoiceEvents onto the request's queue, thread-safely."""

    def __init__(self, index: int, queue: asyncio.Queue[ChoiceEvent], loop: asyncio.AbstractEventLoop,
                 tokenizer: TextTokenizer, stop_strings: list[str], eos_ids: set[int]) -> None:
        self.index, self.queue, self.loop = index, queue, loop
        self.stream = TextStream(tokenizer, stop_strings)
        self.eos_ids = eos_ids

    def _put(self, event: ChoiceEvent) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def prompt_scored(self, logprobs: list[TokenLogprob | None]) -> None:
        self._put(ChoiceEvent(self.index, "prompt", prompt_logprobs=logprobs))

    def token(self, token_id: int, logprob: TokenLogprob | None) -> bool:
        piece = "" if token_id in self.eos_ids else self.stream.push(token_id)
        self._put(ChoiceEvent(self.index, "token", token_id, piece, logprob))
        return self.stream.stopped_text is not None

    def finished(self, reason: str, error: BaseException | None) -> None:
        rest = self.stream.finish()
        finish = "stop" if self.stream.stopped_text is not None else reason
        self._put(ChoiceEvent(self.index, "end", text=rest, finish_reason=finish, error=error))
