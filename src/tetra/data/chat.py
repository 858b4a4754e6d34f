"""Conversations as training data: chat, alpaca and sharegpt records turned into one message list, rendered with
the tokenizer's own chat template, tokenized, and given a loss mask that says which tokens are trained.

The mask comes from the template itself: the text the template adds for an assistant turn is what rendering the
conversation through that turn adds to rendering it up to the generation prompt before the turn. So whatever a
template writes around a reply (role headers, end-of-turn tokens), the reply and its end-of-turn marker are
trained and nothing else is, unless --train-on asks for more.

Entry points: messages_from_record(record, format), ChatEncoder(tokenizer, train_on).encode(messages).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tetra.data.tokenizer import TextTokenizer
from tetra.errors import DataError

FORMATS = ("chat", "alpaca", "sharegpt", "text")
TRAIN_ON = ("assistant", "all", "last-assistant")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class RecordError(DataError):
    """One record cannot be used (malformed, unknown role, ...); prepare names it or counts it."""


def _messages(values: Any, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    if not isinstance(values, list) or not values:
        raise RecordError("its message list is missing or empty")
    messages = []
    for number, message in enumerate(values, start=1):
        if not isinstance(message, dict) or not isinstance(message.get(content_key), str):
            raise RecordError(f"message {number} has no string {content_key!r}")
        role = message.get(role_key)
        if role not in roles:
            raise RecordError(f"message {number} has the role {role!r}; known roles: {', '.join(roles)}")
        messages.append({"role": roles[role], "content": message[content_key]})
    return messages


def messages_from_record(record: Any, format: str) -> list[dict[str, str]]:
    """The conversation a record holds, as [{role, content}] with roles system / user / assistant."""
    if not isinstance(record, dict):
        raise RecordError("it is not a JSON object")
    if format == "chat":
        return _messages(record.get("messages"), "role", "content", {role: role for role in ROLES})
    if format == "sharegpt":
        return _messages(record.get("conversations"), "from", "value", SHAREGPT_ROLES)
    if format == "alpaca":
        instruction, extra, output = (record.get(key, "") for key in ("instruction", "input", "output"))
        if not all(isinstance(value, str) for value in (instruction, extra, output)) or "instruction" not in record \
                or "output" not in record:
            raise RecordError("an alpaca record needs string fields 'instruction' and 'output' (and optional 'input')")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        if isinstance(record.get("system"), str) and record["system"].strip():
            messages.insert(0, {"role": "system", "content": record["system"]})
        return messages
    raise DataError(f"--format {format!r} is unknown; choose one of {', '.join(FORMATS)}")


def require_assistant_text(messages: list[dict[str, str]]) -> None:
    """Refuse a conversation whose assistant turns are all empty: nothing in it would be trained."""
    if not any(message["role"] == "assistant" and message["content"].strip() for message in messages):
        raise RecordError("it has no assistant message with text, so nothing would be trained")


@dataclass
class EncodedConversation:
    """Token ids of one rendered conversation and which of them the loss trains on."""

    tokens: np.ndarray  # int64 [n]
    mask: np.ndarray  # bool [n]: True where the token is a training target


class ChatEncoder:
    """Renders conversations with a tokenizer's chat template and marks the trained tokens."""

    def __init__(self, tokenizer: TextTokenizer, train_on: str = "assistant") -> None:
        if train_on not in TRAIN_ON:
            raise DataError(f"--train-on {train_on!r} is unknown; choose one of {', '.join(TRAIN_ON)}")
        if not tokenizer.chat_template:
            raise DataError("The tokenizer has no chat template (no 'chat_template' in tokenizer_config.json and no "
                            "chat_template.jinja), so chat, alpaca and sharegpt records cannot be rendered. Use the "
                            "tokenizer of an instruction-tuned model, add a template, or prepare plain text with "
                            "--format text.")
        self.tokenizer, self.train_on = tokenizer, train_on

    def _assistant_spans(self, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
        """Character spans of the text each assistant turn adds to the rendered conversation."""
        spans, cursor = [], 0
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True)
            through = self.tokenizer.apply_chat_template(messages[: index + 1], add_generation_prompt=False)
            if through.startswith(before) and text.startswith(through):
                spans.append((len(before), len(through)))
                cursor = len(through)
                continue
            # Templates that rewrite earlier turns: fall back to finding the reply's text after the last span.
            start = text.find(message["content"], cursor)
            if start < 0:
                raise RecordError("the chat template does not reproduce an assistant message's text")
            cursor = start + len(message["content"])
            spans.append((start, cursor))
        return spans

    def encode(self, messages: list[dict[str, str]]) -> EncodedConversation:
        """Token ids and mask of one conversation; a conversation with no assistant text is refused."""
        require_assistant_text(messages)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        encoding = self.tokenizer.backend.encode(text, add_special_tokens=False)
        tokens = np.asarray(encoding.ids, dtype=np.int64)
        if self.train_on == "all":
            return EncodedConversation(tokens, np.ones(len(tokens), dtype=bool))
        spans = self._assistant_spans(messages, text)
        if self.train_on == "last-assistant":
            spans = spans[-1:]
        starts = np.asarray([start for start, _ in encoding.offsets], dtype=np.int64)
        mask = np.zeros(len(tokens), dtype=bool)
        for start, end in spans:
            mask |= (starts >= start) & (starts < end)
        return EncodedConversation(tokens, mask)
