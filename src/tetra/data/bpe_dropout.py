"""BPE-dropout retokenization (Provilkov et al.; a baseline jailbreak defense in Jain et al.): encode text with the
tokenizer's own merges, but skip each applicable merge with probability p, so the same text arrives as a different,
longer token sequence that still decodes to it exactly. Adversarial suffixes tuned against one segmentation lose
their effect.

Entry point: DropoutBPE(tokenizer, p, seed).encode(text, add_special_tokens) -> token ids, a drop-in for
TextTokenizer.encode (p = 0 gives the tokenizer's own ids); encode_chat(messages) retokenizes only the messages'
contents, leaving the chat template's own text (role headers, separators) as the model was trained to see it.
"""

from __future__ import annotations

import json
import random
import re

from tetra.data.tokenizer import TextTokenizer
from tetra.errors import DataError


class DropoutBPE:
    """Byte-level BPE with merge dropout, seeded; added (special) tokens are kept whole."""

    def __init__(self, tokenizer: TextTokenizer, p: float, seed: int = 0) -> None:
        if not 0 <= p < 1:
            raise ValueError(f"BPE-dropout probability must lie in [0, 1) (got {p})")
        spec = json.loads(tokenizer.backend.to_str())
        model = spec["model"]
        if model.get("type") != "BPE" or spec.get("normalizer") is not None:
            raise DataError("Retokenization needs a byte-level BPE tokenizer without a normalizer; this tokenizer is "
                            f"{model.get('type')} with normalizer {spec.get('normalizer')}.")
        self.tokenizer, self.p = tokenizer, p
        self.random = random.Random(seed)
        self.vocab: dict[str, int] = model["vocab"]
        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.ranks = {pair: rank for rank, pair in enumerate(pairs)}
        self.whole_words = bool(model.get("ignore_merges"))
        added = sorted((token["content"] for token in spec.get("added_tokens", [])), key=len, reverse=True)
        self.added = {content: tokenizer.backend.token_to_id(content) for content in added}
        self.split_added = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None
        self.prefix = tokenizer.encode("", add_special_tokens=True)  # what the tokenizer adds itself (its BOS)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text, merges dropped at random; add_special_tokens prepends the tokenizer's BOS."""
        ids: list[int] = list(self.prefix) if add_special_tokens else []
        parts = self.split_added.split(text) if self.split_added else [text]
        for part in parts:
            if part in self.added:
                ids.append(self.added[part])
            elif part:
                pre = self.tokenizer.backend.pre_tokenizer
                for piece, _ in (pre.pre_tokenize_str(part) if pre else [(part, None)]):
                    ids += [self.vocab[symbol] for symbol in self._merge(piece)]
        return ids

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The chat template rendered around the messages; only the contents go through dropout."""
        sentinels = [f"\x00{index}\x00" for index in range(len(messages))]
        marked = [{**message, "content": sentinel} for message, sentinel in zip(messages, sentinels, strict=True)]
        rendered = self.tokenizer.apply_chat_template(marked, add_generation_prompt)
        ids: list[int] = []
        for index, part in enumerate(re.split("\x00(\\d+)\x00", rendered)):
            if index % 2:
                ids += self.encode(messages[int(part)]["content"])
            elif part:
                ids += self.tokenizer.encode(part, add_special_tokens=False)
        return ids

    def _merge(self, piece: str) -> list[str]:
        if self.whole_words and piece in self.vocab and self.p == 0:
            return [piece]
        symbols = list(piece)
        while len(symbols) > 1:
            pairs = zip(symbols, symbols[1:], strict=False)
            candidates = [(self.ranks[pair], index) for index, pair in enumerate(pairs)
                          if pair in self.ranks and (self.p == 0 or self.random.random() >= self.p)]
            if not candidates:
                break  # every applicable merge was dropped this round: the segmentation stops here
            _, index = min(candidates)
            symbols[index : index + 2] = [symbols[index] + symbols[index + 1]]
        return symbols
