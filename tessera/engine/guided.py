"""Structured output: grammars compiled from the model's tokenizer, one matcher per sequence, and the
batched token mask the sampler applies.

Library: xgrammar. Its masks are precomputed per grammar state (most tokens are decided when the
grammar compiles, the rest checked at run time), a batch's masks are one int32 bitmask tensor applied
by one call (`apply_token_bitmask_inplace`, C++ on a CPU, a kernel on a GPU), and it installs here as
a plain wheel. llguidance is as fast per token and also installs cleanly, but its Python API hands out
masks per sequence and knows JSON schema through its own dialect; vLLM and SGLang default to
xgrammar, so its grammar dialect (EBNF/GBNF) is the one vLLM clients already send.

State follows the tokens: a sequence's matcher has accepted exactly its output tokens. A token is
accepted once, when the engine appends it after sampling; a preempted sequence is recomputed from its
tokens without sampling them again, so its matcher is left as it is. A finished or aborted sequence
drops its matcher (Scheduler.finish).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from tessera.errors import InvalidRequestError
from tessera.guided_params import GuidedDecodingParams

log = logging.getLogger("tessera")

_COMPACT = (", ", ": ")  # JSON separators when any whitespace is disallowed
MAX_CACHED_GRAMMARS = 256


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # it is in the `serve` extra, not the engine's core dependencies
        raise InvalidRequestError(
            "guided decoding needs xgrammar: pip install 'tessera-llm[structured]'") from e
    return xgrammar


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose sentences are exactly `choices` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


@dataclass
class GuidedState:
    """One sequence's place in its grammar: the matcher has accepted exactly its output tokens."""

    matcher: object  # xgrammar.GrammarMatcher
    num_accepted: int = 0  # == the sequence's output tokens (tests check it survives preemption)

    def accept(self, token: int) -> bool:
        ok = bool(self.matcher.accept_token(token))
        self.num_accepted += ok
        return ok

    @property
    def terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


class GrammarCache:
    """Compiles constraints for one model's tokenizer; the same constraint is compiled once.

    Compilation runs on the caller's thread (the server validates requests before they reach the
    engine thread), so the cache is guarded by a lock."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler = None
        # least recently used first; bounded, since a server may see endless distinct schemas
        self._compiled: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0  # compilations actually run (the rest were cache hits)

    def _get_compiler(self):
        if self._compiler is None:
            if self.tokenizer is None:
                raise InvalidRequestError("guided decoding needs the model's tokenizer, and this model has none")
            xgr = _xgrammar()
            try:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
            except Exception as e:  # a tokenizer xgrammar cannot read: the request cannot be served
                raise InvalidRequestError(f"guided decoding is unavailable for this model's tokenizer: {e}") from e
            self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        return self._compiler

    def compile(self, params: GuidedDecodingParams):
        """The compiled grammar of `params`; InvalidRequestError naming the field when it is invalid."""
        key = params.cache_key()
        with self._lock:
            hit = self._compiled.get(key)
            if hit is not None:
                self._compiled.move_to_end(key)
                return hit
            compiled = self._compile(params)
            self._compiled[key] = compiled
            if len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)  # running matchers keep their own reference
            self.num_compiled += 1
            return compiled

    def _compile(self, params: GuidedDecodingParams):
        compiler = self._get_compiler()
        kind = params.kind
        ws = {"any_whitespace": False, "separators": _COMPACT} if params.disable_any_whitespace else {}
        try:
            if kind == "json":
                return compiler.compile_json_schema(json.dumps(params.json), **ws)
            if kind == "json_object":
                # OpenAI's json_object is an object with any members (not strict: extra keys allowed)
                return compiler.compile_json_schema('{"type": "object"}', strict_mode=False, **ws)
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(list(params.choice)))
            return compiler.compile_grammar(params.grammar)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError subclasses with its reason
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidRequestError(f"invalid guided_decoding: cannot compile the {kind}: {reason}") from None

    def new_state(self, params: GuidedDecodingParams) -> GuidedState:
        xgr = _xgrammar()
        return GuidedState(xgr.GrammarMatcher(self.compile(params)))


def apply_grammar_mask(logits: torch.Tensor, seqs: list) -> None:
    """In place: the tokens each guided row's grammar forbids get -inf; other rows are untouched.

    One bitmask tensor for the batch, each guided row filled by its matcher, applied by one xgrammar
    call over the guided rows' indices. A row that had every allowed token banned already (min_tokens
    banning the EOS a finished grammar needs) gets its allowed stop tokens back: the grammar wins."""
    rows = [i for i, s in enumerate(seqs) if getattr(s, "guided", None) is not None]
    if not rows:
        return
    xgr = _xgrammar()
    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(seqs), vocab)
    for i in rows:
        seqs[i].guided.matcher.fill_next_token_bitmask(bitmask, i)
    mask = bitmask.to(logits.device)
    xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=vocab, indices=rows)
    dead = torch.isneginf(logits[rows].amax(dim=-1)).tolist()
    for k, i in enumerate(rows):
        if dead[k]:
            logits[i, list(seqs[i].guided.matcher.stop_token_ids)] = 0.0
            xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=vocab, indices=[i])
