"""`tetra data prepare --format chat|alpaca|sharegpt`: conversations rendered with the tokenizer's chat template,
stored as token shards with a parallel loss mask, with every unusable record reported and counted.

Entry point: prepare_chat_data(source, tokenizer, staging, options) -> the split entries and record counts for
meta.json (prepare.prepare_data calls it and writes the folder).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tetra.data.chat import ChatEncoder, EncodedConversation, RecordError, messages_from_record, require_assistant_text
from tetra.data.refusal import RefusalTokens
from tetra.data.shards import ShardWriter
from tetra.data.sources import iter_records
from tetra.data.tokenizer import TextTokenizer
from tetra.errors import DataError

TOO_LONG = ("drop", "truncate")


@dataclass
class ChatOptions:
    """How records become training examples."""

    format: str = "chat"  # chat | alpaca | sharegpt
    train_on: str = "assistant"  # assistant | all | last-assistant
    max_length: int = 0  # tokens per conversation at most (0 = no limit); train with data.seq_len >= this - 1
    too_long: str = "drop"  # drop | truncate: what happens to longer conversations
    skip_bad_records: bool = False  # count and skip malformed records instead of stopping at the first
    refusal: RefusalTokens | None = None  # put a [respond] / [refuse...] token in front of every reply

    def check(self) -> None:
        if self.too_long not in TOO_LONG:
            raise DataError(f"--too-long {self.too_long!r} is unknown; choose one of {', '.join(TOO_LONG)}")
        if self.max_length < 0:
            raise DataError(f"--max-length must be 0 (no limit) or positive (got {self.max_length})")


def _fit(encoded: EncodedConversation, options: ChatOptions) -> EncodedConversation | None:
    """The conversation within max_length: unchanged, truncated, or None when it is dropped."""
    if not options.max_length or len(encoded.tokens) <= options.max_length:
        return encoded
    if options.too_long == "drop":
        return None
    cut = EncodedConversation(encoded.tokens[: options.max_length], encoded.mask[: options.max_length])
    return cut if cut.mask.any() else None


def prepare_chat_data(source: str, tokenizer: TextTokenizer, writers: dict[str, ShardWriter],
                      is_validation: Callable[[int], bool], options: ChatOptions,
                      progress: Callable[[int], None] = lambda count: None) -> dict[str, Any]:
    """Encode every record into the writers; returns the counts meta.json keeps (kept, skipped by reason)."""
    options.check()
    encoder = ChatEncoder(tokenizer, options.train_on)
    counts = {"records": 0, "kept": 0, "malformed": 0, "empty": 0, "too_long_dropped": 0, "truncated": 0,
              "trained_tokens": 0}
    examples: list[str] = []
    for where, record in iter_records(source):
        counts["records"] += 1
        try:
            if isinstance(record, DataError):
                raise record
            messages = messages_from_record(record, options.format)
            if options.refusal is not None:
                require_assistant_text(messages)  # before the token makes every reply non-empty
                messages = options.refusal.mark(messages, record)
            encoded = encoder.encode(messages)
        except RecordError as error:
            reason = "empty" if "nothing would be trained" in str(error) else "malformed"
            if reason == "malformed" and not options.skip_bad_records:
                raise DataError(f"{where}: the record cannot be used: {error}. Fix the record, or pass "
                                "--skip-bad-records to count and skip such records.") from None
            counts[reason] += 1
            if len(examples) < 3:
                examples.append(f"{where}: {error}")
            continue
        except DataError as error:  # e.g. a template that raises on this record
            if not options.skip_bad_records:
                raise DataError(f"{where}: {error}") from None
            counts["malformed"] += 1
            continue
        fitted = _fit(encoded, options)
        if fitted is None:
            counts["too_long_dropped"] += 1
            continue
        counts["truncated"] += int(len(fitted.tokens) < len(encoded.tokens))
        writers["val" if is_validation(counts["kept"]) else "train"].add(fitted.tokens, fitted.mask)
        counts["kept"] += 1
        counts["trained_tokens"] += int(fitted.mask.sum())
        progress(1)
    skipped = counts["malformed"] + counts["empty"] + counts["too_long_dropped"]
    if skipped:
        sys.stderr.write(f"skipped {skipped} of {counts['records']} records: {counts['malformed']} malformed, "
                         f"{counts['empty']} with no assistant text, {counts['too_long_dropped']} longer than "
                         f"--max-length {options.max_length}" + "".join(f"\n  {line}" for line in examples) + "\n")
    if counts["kept"] == 0:
        raise DataError(f"{source!r} gave no usable conversation ({counts['records']} records read). Check "
                        "--format and the records.")
    return counts

