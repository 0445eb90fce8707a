"""Generated tokens' logprobs as the OpenAI APIs write them: the legacy completions form (tokens,
token_logprobs, top_logprobs, text_offset) and the chat form (content: token, logprob, bytes,
top_logprobs). A token's text and UTF-8 bytes are decoded once and cached; a logprob that is not finite
is written as -9999.0, as vLLM writes it (JSON has no -inf)."""

from __future__ import annotations

import math

from tessera.serve.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from tessera.serve.sse import ChoiceState
from tessera.tokenizer import token_bytes


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


class LogprobFormatter:
    """Formats logprobs for one tokenizer (None: a model served without one; tokens are `token_id:N`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._tokens: dict[int, tuple[str, bytes]] = {}

    def token(self, tid: int) -> tuple[str, bytes]:
        """A token's text alone (U+FFFD where it is only part of a character) and its own UTF-8 bytes."""
        got = self._tokens.get(tid)
        if got is None:
            if self.tokenizer is None:
                s = f"token_id:{tid}"
                got = (s, s.encode())
            else:
                got = (self.tokenizer.decode([tid]), token_bytes(self.tokenizer, tid))
            if len(self._tokens) < 1 << 18:
                self._tokens[tid] = got
        return got

    def token_str(self, tid: int) -> str:
        return self.token(tid)[0]

    def completion_logprobs(self, token_ids: list[int], lps: list[dict], st: ChoiceState) -> dict:
        """Legacy completions logprobs; st.text_offset (characters) moves on by the text of the tokens'
        bytes, so a character split over tokens counts once and every offset indexes the text."""
        res = CompletionLogprobs()
        for tid, entry in zip(token_ids, lps, strict=False):
            s, raw = self.token(tid)
            lp = entry.get(tid) if entry is not None else None  # None: an echoed prompt's first token
            res.tokens.append(s)
            res.token_logprobs.append(_finite(lp.logprob) if lp is not None else None)
            res.top_logprobs.append(
                None if entry is None else
                {self.token_str(t): _finite(v.logprob) for t, v in sorted(entry.items(), key=lambda kv: kv[1].rank)}
            )
            res.text_offset.append(st.text_offset)
            st.text_offset += len(st.utf8.decode(raw))
        return res.model_dump()

    def chat_logprobs(self, token_ids: list[int], lps: list[dict], k: int) -> dict:
        content = []
        for tid, entry in zip(token_ids, lps, strict=False):
            s, raw = self.token(tid)
            lp = entry.get(tid)
            tops = sorted((v for v in entry.values() if v.rank <= k), key=lambda v: v.rank)[:k]
            content.append(
                ChatTokenLogprob(
                    token=s,
                    logprob=_finite(lp.logprob) if lp is not None else -9999.0,
                    bytes=list(raw),
                    top_logprobs=[
                        TopLogprob(
                            token=self.token_str(v.token_id),
                            logprob=_finite(v.logprob),
                            bytes=list(self.token(v.token_id)[1]),
                        )
                        for v in tops
                    ],
                )
            )
        return ChatLogprobs(content=content).model_dump()

