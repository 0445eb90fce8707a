"""Tokenizer helpers: a token's own bytes, and text that no tokenizer can encode."""

from __future__ import annotations

import pytest

from tessera import InvalidRequestError
from tessera.tokenizer import check_text, token_bytes


class SentencePieceLike:
    """A slow (no `tokenizers` backend) SentencePiece-style vocabulary with byte fallback."""

    pieces = ["<s>", "\u2581caf", "é", "<0xE4>", "<0xBD>", "<0xA0>", "\u2581ok"]
    added_tokens_decoder = {0: "<s>"}

    def convert_ids_to_tokens(self, i):
        return self.pieces[i]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids).replace("\u2581", " ")


def test_token_bytes_of_sentencepiece_pieces_and_byte_fallback():
    tok = SentencePieceLike()
    assert b"".join(token_bytes(tok, i) for i in range(1, 7)) == " café你 ok".encode()
    assert token_bytes(tok, 3) == b"\xe4" and token_bytes(tok, 0) == b"<s>"


@pytest.mark.parametrize("value,where", [
    ("a\ud800", "prompt"),
    ([{"role": "user", "content": "\udfff"}], "messages[0].content"),
    ({"parts": ["ok", "x\udc80"]}, "messages.parts[1]"),
])
def test_lone_surrogates_are_named(value, where):
    with pytest.raises(InvalidRequestError, match="lone surrogate") as e:
        check_text(value, "prompt" if isinstance(value, str) else "messages")
    assert str(e.value).startswith(where + " ")
    check_text(["fine", {"ok": "😀"}], "messages")  # valid text passes
