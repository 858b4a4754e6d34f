"""A Hugging Face tokenizer rebuilt from a GGUF file's metadata (vocabulary, merges, token types, special ids, chat
template), so a model read from GGUF gets the tokenizer.json + tokenizer_config.json every other tool loads.

llama.cpp names the text-splitting rule of each byte-level vocabulary (`tokenizer.ggml.pre`); each known name maps
to the same pre-tokenizer the model's original tokenizer.json used, so ids match the original model's.

Entry points: tokenizer_from_gguf(metadata) -> TextTokenizer, and load_tokenizer(path) for a tokenizer folder or
a GGUF file alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from tetra.data.tokenizer import TextTokenizer
from tetra.errors import DataError
from tetra.files import is_gguf_file

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> how text is split before the merges: GPT-2's rule, GPT-2's rule after cutting every digit
# apart, or a regex of its own followed by the byte mapping.
PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), "digits"),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which byte-level vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _pre_tokenizer(kind: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind in ("gpt2", "digits"))
    if kind == "gpt2":
        return byte_level
    if kind == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(kind), behavior="isolated"), byte_level])


def _special(metadata: dict[str, Any], tokens: list[str], key: str) -> str | None:
    index = metadata.get(f"tokenizer.ggml.{key}")
    return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None


def tokenizer_from_gguf(metadata: dict[str, Any]) -> TextTokenizer:
    """The byte-level BPE tokenizer a GGUF file describes, with its special tokens and chat template."""
    model_kind = metadata.get("tokenizer.ggml.model")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if model_kind != "gpt2":
        raise DataError(f"The GGUF file's tokenizer is of type {model_kind!r}; tetra rebuilds byte-level BPE "
                        "tokenizers (type 'gpt2': Llama 3, SmolLM, Qwen2, GPT-2 and most recent models). For a "
                        "SentencePiece model, pass the original tokenizer folder with --tokenizer.")
    if pre not in PRE_TOKENIZERS:
        raise DataError(f"The GGUF file's pre-tokenizer {pre!r} is unknown to tetra; known: "
                        f"{', '.join(sorted(PRE_TOKENIZERS))}. Pass the original tokenizer folder with --tokenizer.")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    # Ordinary tokens written outside the byte alphabet (a literal space) are respelled in it; control and
    # user-defined tokens keep their spelling, since they are matched whole in the text (DeepSeek's
    # <｜begin▁of▁sentence｜> is not byte-alphabet text).
    spelled = [token if set(token) <= letters or kind in (CONTROL, USER_DEFINED)
               else "".join(alphabet[b] for b in token.encode("utf-8"))
               for token, kind in zip(tokens, types, strict=True)]
    vocab = {token: index for index, token in enumerate(spelled)}
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges") or []]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(PRE_TOKENIZERS[pre])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                for token, kind in zip(tokens, types, strict=True) if kind == CONTROL])
    backend.add_tokens([AddedToken(token, normalized=False, special=False)
                        for token, kind in zip(spelled, types, strict=True) if kind == USER_DEFINED])
    bos = _special(metadata, tokens, "bos_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, vocab[bos])])])
    extra = {"add_bos_token": add_bos, "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False))}
    unknown = _special(metadata, tokens, "unknown_token_id")
    if unknown is not None:
        extra["unk_token"] = unknown
    template = metadata.get("tokenizer.chat_template")
    return TextTokenizer(backend, bos_token=bos, eos_token=_special(metadata, tokens, "eos_token_id"),
                         pad_token=_special(metadata, tokens, "padding_token_id"),
                         chat_template=template if isinstance(template, str) else None, extra_config=extra)


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer of a folder (tokenizer.json) or of a GGUF model file (rebuilt from its metadata)."""
    path = Path(path)
    if not is_gguf_file(path):
        return TextTokenizer.load(path)
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as error:
        raise DataError(f"{path} is not a readable GGUF file ({error}).") from None
    metadata = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in metadata:
        raise DataError(f"{path} carries no tokenizer (no tokenizer.ggml.tokens); pass one with --tokenizer.")
    return tokenizer_from_gguf(metadata)
