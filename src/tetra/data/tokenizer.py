"""Tokenizers through the Hugging Face `tokenizers` library: load tokenizer.json folders, train byte-level BPE.

Entry points: TextTokenizer.load(folder), TextTokenizer.save(folder) and train_bpe(documents, vocab_size).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tetra.errors import DataError
from tetra.files import read_json, write_json

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template from tokenizer_config.json."""

    backend: Tokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: str | Path) -> TextTokenizer:
        """Read tokenizer.json (required) and tokenizer_config.json (optional) from a folder."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"No tokenizer found: {path} does not exist. Put the model's tokenizer.json there, "
                            "or train one with `tetra tokenizer train SOURCE --vocab-size N --out DIR`.")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust library raises its own exception type
            raise DataError(f"{path} is not a valid tokenizer.json ({error}).") from None
        config = read_json(folder / "tokenizer_config.json", "tokenizer settings") \
            if (folder / "tokenizer_config.json").is_file() else {}
        template = config.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")),
                   _token_text(config.get("pad_token")), template if isinstance(template, str) else None, config)

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json (what AutoTokenizer reads)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        special = {name: value for name, value in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                                   ("pad_token", self.pad_token)) if value is not None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "model_max_length": 1_000_000, **self.extra_config, **special}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        write_json(folder / "tokenizer_config.json", config)
        write_json(folder / "special_tokens_map.json", special)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def fingerprint(self) -> str:
        """A hash of the vocabulary and merges: prepared data records it so a different tokenizer is refused."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()[:16]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [item.ids for item in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's Jinja chat template (as transformers does)."""
        if not self.chat_template:
            raise DataError("This tokenizer has no chat template (tokenizer_config.json has no 'chat_template'); "
                            "pass the prompt as plain text instead.")
        import jinja2

        environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise_template_error
        try:
            return environment.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as error:
            raise DataError(f"The tokenizer's chat template failed on these messages ({error}). Check the "
                            "template in tokenizer_config.json, or the messages' roles and order.") from None


def _raise_template_error(message: str) -> None:
    raise DataError(f"The chat template refused the messages: {message}")


def train_bpe(documents: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE (GPT-2 style: any byte sequence is encodable) with <|endoftext|> and <|pad|>."""
    if vocab_size < 300:
        raise DataError(f"--vocab-size must be at least 300 (256 byte tokens + merges + specials); got {vocab_size}.")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[END_OF_TEXT, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(documents, trainer=trainer)
    return TextTokenizer(backend, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=PAD)
