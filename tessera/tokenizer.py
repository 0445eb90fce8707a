"""Tokenizer loading (HF tokenizer files, offline) and chat templates (incremental detokenization is in
tessera.engine.output_processor)."""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

from tessera.chat_tools import render_tool_messages
from tessera.errors import InvalidRequestError, ModelLoadError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tessera never reaches a hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def load_tokenizer(path: Path):
    """The HF tokenizer in `path`, or None when the checkpoint ships none (token-id prompts only)."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise ModelLoadError(f"cannot load the tokenizer in {str(path)!r}: {e}") from e


def check_text(value, where: str) -> None:
    """Raises InvalidRequestError when a string in `value` (a string, or lists and dicts of them) holds
    a lone surrogate: such a string is not valid Unicode text and no tokenizer can encode it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(
                f"{where} is not valid Unicode text: it contains a lone surrogate (U+{ord(value[e.start]):04X}) "
                f"at character {e.start}") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_text(v, f"{where}[{i}]")


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None, **kwargs) -> list[int]:
    """tools: OpenAI function tools, rendered by the template or, where it ignores them, by tessera's
    Hermes-style fallback (tessera.chat_tools), as are assistant `tool_calls` and `tool` messages."""
    if tokenizer is None:
        raise InvalidRequestError("this model has no tokenizer, so chat messages cannot be encoded")
    if getattr(tokenizer, "chat_template", None) is None and not kwargs.get("chat_template"):
        raise InvalidRequestError("this model's tokenizer has no chat template")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages
    ):
        raise InvalidRequestError("a chat must be a non-empty list of {'role': ..., 'content': ...} messages")
    check_text(messages, "messages")
    messages, tool_kwargs = render_tool_messages(tokenizer, messages, tools, kwargs.get("chat_template"))
    out = tokenizer.apply_chat_template(messages, **tool_kwargs, add_generation_prompt=add_generation_prompt,
                                        tokenize=True, **kwargs)
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def load_chat_template(value: str | None) -> str | None:
    """A chat template given on the command line (vLLM's --chat-template): the contents of the file it
    names, or, when no such file exists and it reads as a template (braces or newlines), the template
    itself, with escapes such as \\n decoded. Checked for Jinja syntax here, so a broken one fails at start."""
    if value is None:
        return None
    path = Path(value)
    try:
        template = path.read_text(encoding="utf-8")
    except OSError as e:
        if not any(c in value for c in "{}\n"):
            raise InvalidRequestError(
                f"--chat-template {value!r} looks like a file path, but cannot be read: {e}") from None
        # backslashreplace first: unicode_escape alone would garble characters beyond Latin-1
        template = value.encode("latin-1", "backslashreplace").decode("unicode_escape")
    import jinja2

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidRequestError(f"--chat-template is not a valid Jinja template: {e}") from None
    return template


@cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the byte each character of a byte-level BPE token stands for."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    hidden = [b for b in range(256) if b not in visible]
    table = {chr(b): b for b in visible}
    table.update({chr(256 + i): b for i, b in enumerate(hidden)})
    return table


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The UTF-8 bytes one token stands for. A token that is only part of a character decodes alone to
    U+FFFD; its bytes are still its own, so the bytes of a text's tokens add up to the text's bytes."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return b""
    if token_id in tokenizer.added_tokens_decoder:  # added and special tokens stand for their own text
        return piece.encode()
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and "ByteLevel" in str(backend.decoder):
        table = _byte_level_table()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
    byte = _BYTE_FALLBACK.fullmatch(piece)  # SentencePiece's byte fallback
    if byte:
        return bytes([int(byte.group(1), 16)])
    if "\u2581" in piece:  # SentencePiece's word boundary
        return piece.replace("\u2581", " ").encode()
    return tokenizer.decode([token_id]).encode()
