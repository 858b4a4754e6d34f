"""OpenAI's response bodies: completions and chat completions, whole or as streamed chunks, with logprobs.

Entry points: ChoiceResult (one choice gathered from its events), completion_body, chat_body, the *_chunk
builders and completion_logprobs / chat_logprobs.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tetra.data.tokenizer import TextTokenizer
from tetra.infer.logprobs import TokenLogprob
from tetra.serve.choices import ChoiceEvent


@dataclass
class ChoiceResult:
    """Everything one choice produced."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None

    def add(self, event: ChoiceEvent) -> None:
        if event.kind == "prompt":
            self.prompt_logprobs = event.prompt_logprobs
        elif event.kind == "token":
            self.token_ids.append(event.token_id)
            self.logprobs.append(event.logprob)
            self.text += event.text
        else:
            self.text += event.text
            self.finish_reason, self.error = event.finish_reason, event.error


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _piece(tokenizer: TextTokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def completion_logprobs(tokenizer: TextTokenizer, token_ids: list[int], scores: list[TokenLogprob | None],
                        offset: int = 0) -> dict[str, Any]:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [_piece(tokenizer, token) for token in token_ids]
    offsets, position = [], offset
    for piece in tokens:
        offsets.append(position)
        position += len(piece)
    top = [None if score is None else {_piece(tokenizer, t): value for t, value in score.top} for score in scores]
    return {"tokens": tokens, "token_logprobs": [None if score is None else score.logprob for score in scores],
            "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokenizer: TextTokenizer, token_ids: list[int], scores: list[TokenLogprob | None]) -> dict[str, Any]:
    """The chat `logprobs` object: one entry per token with its top alternatives."""

    def entry(token: int, value: float) -> dict[str, Any]:
        piece = _piece(tokenizer, token)
        return {"token": piece, "logprob": value, "bytes": list(piece.encode("utf-8"))}

    content = []
    for token, score in zip(token_ids, scores, strict=True):
        if score is not None:
            content.append({**entry(token, score.logprob), "top_logprobs": [entry(t, v) for t, v in score.top]})
    return {"content": content}


def completion_body(request_id: str, model: str, choices: list[dict[str, Any]], usage_: dict[str, int]) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}


def chat_body(request_id: str, model: str, choices: list[dict[str, Any]], usage_: dict[str, int]) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}


def completion_chunk(request_id: str, model: str, index: int, text: str, finish_reason: str | None) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(request_id: str, model: str, index: int, delta: dict[str, str], finish_reason: str | None) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
