"""Tokenizer loading (HF tokenizer files, offline), chat templates and incremental detokenization."""

from __future__ import annotations

import os
from pathlib import Path

from tessera.errors import InvalidRequestError, ModelLoadError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tessera never reaches a hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# Tokens of the prompt kept as left context, so a word-initial space decodes the same as in the stream.
_CONTEXT_TOKENS = 6


def load_tokenizer(path: Path):
    """The HF tokenizer in `path`, or None when the checkpoint ships none (token-id prompts only)."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise ModelLoadError(f"cannot load the tokenizer in {str(path)!r}: {e}") from e


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        **kwargs) -> list[int]:
    if tokenizer is None:
        raise InvalidRequestError("this model has no tokenizer, so chat messages cannot be encoded")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError("this model's tokenizer has no chat template")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages
    ):
        raise InvalidRequestError("a chat must be a non-empty list of {'role': ..., 'content': ...} messages")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True, **kwargs)
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


class Detokenizer:
    """Turns a sequence's new tokens into new text, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def start(self, seq) -> None:
        seq.read_offset = seq.num_prompt_tokens
        seq.prefix_offset = max(0, seq.read_offset - _CONTEXT_TOKENS)
        seq.text = ""

    def update(self, seq, final: bool = False) -> str:
        """Appends to seq.text the text of tokens not yet read; returns what was appended.

        Text ending in an incomplete character is held back unless `final`."""
        if self.tokenizer is None or seq.read_offset >= seq.num_tokens:
            return ""
        skip = seq.params.skip_special_tokens
        ids = seq.token_ids
        before = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip)
        if len(full) <= len(before) or (full.endswith("\ufffd") and not final):
            return ""  # wait for the rest of a multi-byte character
        delta = full[len(before):]
        seq.prefix_offset = max(seq.read_offset, seq.num_tokens - _CONTEXT_TOKENS)
        seq.read_offset = seq.num_tokens
        seq.text += delta
        return delta
