"""Refusal tokens (Jain et al. 2024) at data preparation: every assistant reply starts with [respond], or with a
refusal token when the record has a `refusal_category`: [refuse] (binary), or one token per category,
[refuse:CATEGORY] (categories). The tokens are added to the tokenizer as special tokens and recorded in its
tokenizer_config.json (`refusal_tokens`), so a trained model can later be steered by thresholds on their
probabilities without retraining.

Entry point: RefusalTokens(mode).scan(records) / .extend(tokenizer) / .mark(messages, record).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tokenizers import AddedToken

from tetra.data.tokenizer import TextTokenizer
from tetra.errors import DataError

MODES = ("binary", "categories")
RESPOND = "[respond]"
REFUSE = "[refuse]"
CONFIG_KEY = "refusal_tokens"


def category_of(record: Any) -> str | None:
    """The record's refusal category (a non-empty string), or None for a record that should be answered."""
    value = record.get("refusal_category") if isinstance(record, dict) else None
    return value.strip() if isinstance(value, str) and value.strip() else None


@dataclass
class RefusalTokens:
    """Which token each reply gets."""

    mode: str = "binary"
    categories: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DataError(f"--refusal-tokens {self.mode!r} is unknown; choose one of {', '.join(MODES)}")

    def scan(self, records: Iterable[Any]) -> None:
        """Collect the categories the records use (categories mode needs one token each)."""
        found = {category for record in records if (category := category_of(record))}
        self.categories = sorted(found)

    def token_for(self, category: str | None) -> str:
        if category is None:
            return RESPOND
        return REFUSE if self.mode == "binary" else f"[refuse:{category}]"

    def tokens(self) -> dict[str, Any]:
        """{respond: token, refuse: {category: token}} ('refuse' is the category name in binary mode)."""
        refuse = {"refuse": REFUSE} if self.mode == "binary" else {c: self.token_for(c) for c in self.categories}
        return {"respond": RESPOND, "refuse": refuse}

    def extend(self, tokenizer: TextTokenizer) -> TextTokenizer:
        """The tokenizer with the refusal tokens added as special tokens and listed in its config."""
        table = self.tokens()
        new = [RESPOND, *table["refuse"].values()]
        tokenizer.backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in new])
        tokenizer.extra_config = {**tokenizer.extra_config, CONFIG_KEY: table}
        return tokenizer

    def mark(self, messages: list[dict[str, str]], record: Any) -> list[dict[str, str]]:
        """The conversation with the record's token in front of every assistant reply."""
        token = self.token_for(category_of(record))
        return [{**message, "content": token + message["content"]} if message["role"] == "assistant" else message
                for message in messages]


def refusal_table(tokenizer: TextTokenizer) -> dict[str, Any] | None:
    """The refusal tokens a tokenizer was extended with, with their ids, or None."""
    table = tokenizer.extra_config.get(CONFIG_KEY)
    if not isinstance(table, dict):
        return None
    ids = {name: tokenizer.backend.token_to_id(token) for name, token in table["refuse"].items()}
    respond = tokenizer.backend.token_to_id(table["respond"])
    if respond is None or None in ids.values():
        raise DataError("The tokenizer's config lists refusal tokens its vocabulary does not have; the tokenizer "
                        "files do not belong together. Use the tokenizer saved with the trained model.")
    return {"respond": respond, "refuse": ids}
