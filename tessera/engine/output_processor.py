"""OutputProcessor: from sampled tokens to the text a caller sees, in one place for every caller
(`LLM`, the server's streams, `tessera generate` and `tessera run`).

Per sequence it decodes each new token incrementally (tokenizers' `DecodeStream` when the tokenizer
has a fast backend, else a decode of a few tokens of context), checks the stop conditions, flushes
what is still held back when the sequence finishes or is aborted, and gives the text an output may
show. vLLM's semantics throughout:

- A stop token (EOS unless ignore_eos, or one of stop_token_ids) ends the output without adding its
  text, unless include_stop_str_in_output.
- A stop string is looked for only in the text of tokens after the first min_tokens (a match may begin
  up to len(stop) - 1 characters earlier); the text is cut before it (after it with
  include_stop_str_in_output), and the first string of `stop` found wins.
- An unfinished output holds back its last max(len(stop)) - 1 characters when stop strings are to be
  left out: they could still turn out to begin one. So what a stream shows only ever grows, and
  streamed text always adds up to the non-streamed text.
- Text ending in an incomplete character waits for the rest of it; at the end (finish or abort) it is
  flushed as U+FFFD, so text and token ids always agree: text == decode(token_ids), cut at the stop
  string (and less a stop token's text). Like DecodeStream, and vLLM, the text has no clean-up of
  tokenization spaces (transformers' `clean_up_tokenization_spaces`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tessera.engine.sequence import Sequence

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers too old: every sequence takes the plain path
    DecodeStream = None

log = logging.getLogger("tessera")

_CONTEXT_TOKENS = 6  # tokens kept as left context, so that a word-initial space decodes as in the stream


def _prompt_context(tokenizer, prompt_ids: list[int]) -> list[int]:
    """The prompt's last tokens to decode after: 4 or more, starting on a whole character (as vLLM)."""
    if len(prompt_ids) <= 4:
        return list(prompt_ids)
    for n in range(4, min(len(prompt_ids), 23) + 1):
        if "\ufffd" not in tokenizer.decode(prompt_ids[-n:]):
            return list(prompt_ids[-n:])
    return list(prompt_ids[-4:])


class IncrementalDecoder:
    """One sequence's new text, token by token. Text that ends in an incomplete character is held back
    (with the tokens it came from) until the character completes, or until `flush`."""

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.context = _prompt_context(tokenizer, prompt_ids)  # tokens already decoded, kept as context
        self.pending: list[int] = []  # tokens whose text is held back
        self.backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's `tokenizers.Tokenizer`
        self.stream = None
        if self.backend is not None and DecodeStream is not None:
            try:
                self.stream = DecodeStream(ids=self.context, skip_special_tokens=self.skip)
            except TypeError:  # a DecodeStream that cannot be primed with context
                self.stream = None

    def step(self, token: int) -> str:
        """The text `token` completes ("" while it is held back)."""
        self.pending.append(token)
        text = None
        if self.stream is not None:
            try:
                text = self.stream.step(self.backend, token)
            except Exception as e:  # DecodeStream can lose its place on odd byte sequences: go on without it
                log.debug("DecodeStream failed (%s); decoding this sequence without it", e)
                self.stream = None
        if self.stream is None:
            text = self._decode_pending(final=False)
        if text is None:
            return ""
        self._advance()
        return text

    def flush(self) -> str:
        """The text of the held-back tokens, an incomplete character as U+FFFD."""
        if not self.pending:
            return ""
        text = self._decode_pending(final=True)
        self._advance()
        return text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def _decode_pending(self, final: bool) -> str | None:
        before = self._decode(self.context)
        full = self._decode(self.context + self.pending)
        if not final and (len(full) <= len(before) or full.endswith("\ufffd")):
            return None  # nothing yet, or the rest of a multi-byte character is still to come
        return full[len(before):]

    def _advance(self) -> None:
        self.context = (self.context + self.pending)[-_CONTEXT_TOKENS:]
        self.pending = []


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: Callable[[], set[int]]):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    def add(self, seq: Sequence) -> None:
        seq.text = ""
        seq.detok = None
        if self.tokenizer is not None:
            seq.detok = IncrementalDecoder(self.tokenizer, seq.prompt_token_ids, seq.params.skip_special_tokens)

    def append(self, seq: Sequence, token: int) -> str | None:
        """Appends a sampled token to `seq`; returns why it finished ("stop" | "length") or None."""
        seq.token_ids.append(token)
        params = seq.params
        num_out = seq.num_output_tokens
        stop_token = token in seq.stop_token_set and num_out >= params.min_tokens
        length = seq.num_tokens >= seq.max_total_tokens
        start = len(seq.text)
        if seq.detok is not None:
            if not stop_token or params.include_stop_str_in_output:
                seq.text += seq.detok.step(token)
            if stop_token or length:
                seq.text += seq.detok.flush()
        if params.min_tokens and num_out <= params.min_tokens:
            start = len(seq.text)  # no stop string in the text of the first min_tokens tokens
        reason = None
        if params.stop_strings and self._cut_at_stop_string(seq, start):
            reason = "stop"
        elif stop_token:
            seq.stop_reason = None if token in self.eos_token_ids() and not params.ignore_eos else token
            reason = "stop"
        elif length:
            reason = "length"
        if reason is not None:
            seq.detok = None
        return reason

    @staticmethod
    def _cut_at_stop_string(seq: Sequence, start: int) -> bool:
        """Looks for the stop strings in the text that ends after `start` (the text before it was
        searched already, or precedes min_tokens); on a match cuts the text there."""
        text = seq.text
        if len(text) <= start:
            return False
        params = seq.params
        for stop in params.stop_strings:
            at = text.find(stop, max(0, start - len(stop) + 1))
            if at >= 0:
                seq.text = text[: at + len(stop)] if params.include_stop_str_in_output else text[:at]
                seq.stop_reason = stop
                return True
        return False

    @staticmethod
    def abort(seq: Sequence) -> None:
        """An aborted (or failed) sequence keeps the text of every token it generated."""
        if seq.detok is not None:
            seq.text += seq.detok.flush()
            seq.detok = None

    @staticmethod
    def text(seq: Sequence) -> str:
        """The text an output shows: an unfinished sequence holds back what could still begin a stop
        string that is to be left out."""
        params = seq.params
        if seq.is_finished or not params.stop_strings or params.include_stop_str_in_output:
            return seq.text
        hold = max(len(s) for s in params.stop_strings) - 1
        return seq.text[: max(0, len(seq.text) - hold)]
