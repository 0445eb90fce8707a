"""SamplingParams: how one request is decoded. Field names and meanings follow vLLM."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tessera.errors import InvalidRequestError
from tessera.guided_params import GuidedDecodingParams


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over output tokens
    frequency_penalty: float = 0.0
    # None: up to the context length; 0: only score the prompt (prompt_logprobs), nothing generated
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    seed: int | None = None
    logprobs: int | None = None  # top-N logprobs of each generated token (plus the token's own)
    # vLLM's: None off; N: each prompt token's own logprob plus the top-N there (RequestOutput.prompt_logprobs)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # The model's next-token entropy (nats) at each of the last N prompt positions, returned as
    # RequestOutput.prompt_entropies: how certain the model is while reading the prompt's end. XL3M's
    # segment scoring reads it; those positions are never skipped through the prefix cache.
    prompt_entropies: int = 0
    # A constraint on the output (JSON schema, regex, choice, grammar, JSON object), vLLM's shape; a
    # dict is taken as GuidedDecodingParams' fields. Enforced by tessera.engine.guided.
    guided_decoding: GuidedDecodingParams | None = None

    # vLLM's best_of: sample best_of sequences, return the n of them with the highest cumulative logprob
    best_of: int | None = None
    # OpenAI's logit_bias: token id (an int, or its decimal string as JSON gives it) -> a bias in
    # [-100, 100] added to that token's logit before sampling
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # vLLM's: only these tokens may be sampled
    # vLLM's: words never to generate; a multi-token word's last token is banned where the output so
    # far ends with the rest of it (tessera.engine.token_constraints)
    bad_words: list[str] | None = None

    stop_strings: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop)
        if isinstance(self.guided_decoding, dict):
            try:
                self.guided_decoding = GuidedDecodingParams(**self.guided_decoding)
            except TypeError as e:
                raise InvalidRequestError(f"invalid sampling parameter: guided_decoding: {e}") from None
        if isinstance(self.logit_bias, dict):  # JSON keys are strings: "50256" means token 50256
            self.logit_bias = {_token_key(k): v for k, v in self.logit_bias.items()}
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"invalid sampling parameter: {msg}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad(f"n must be an integer >= 1, got {self.n!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                raise bad(f"{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            raise bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad(f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            raise bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise bad(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            # As vLLM: a request that generates nothing is only a way to score its prompt.
            raise bad("max_tokens must be >= 1 (0, to only score the prompt, needs prompt_logprobs)")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise bad(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if self.stop_token_ids is not None and any(
            not isinstance(t, int) or t < 0 for t in self.stop_token_ids
        ):
            raise bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.prompt_entropies, int) or self.prompt_entropies < 0:
            raise bad(f"prompt_entropies must be an integer >= 0, got {self.prompt_entropies!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise bad(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int) or not 0 <= self.prompt_logprobs <= 20
        ):
            raise bad(f"prompt_logprobs must be an integer in [0, 20], got {self.prompt_logprobs!r}")
        if self.guided_decoding is not None:
            if not isinstance(self.guided_decoding, GuidedDecodingParams):
                raise bad(f"guided_decoding must be a GuidedDecodingParams, got {type(self.guided_decoding).__name__}")
            self.guided_decoding.validate()
        self._validate_token_constraints(bad)

    def _validate_token_constraints(self, bad) -> None:
        """best_of, logit_bias, allowed_token_ids, bad_words (token ids against the vocabulary are
        checked by the engine, which knows its size: LLMEngine.check_request)."""
        if self.best_of is not None and (not isinstance(self.best_of, int) or isinstance(self.best_of, bool)
                                         or self.best_of < self.n):
            raise bad(f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
            for k, v in self.logit_bias.items():
                if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                    raise bad(f"logit_bias key {k!r} is not a token id (a non-negative integer)")
                if not isinstance(v, int | float) or isinstance(v, bool) or not -100 <= v <= 100:
                    raise bad(f"logit_bias value {v!r} of token {k} must be a number in [-100, 100]")
        if self.allowed_token_ids is not None and (
            not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids
            or any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.allowed_token_ids)
        ):
            raise bad(f"allowed_token_ids must be a non-empty list of token ids, got {self.allowed_token_ids!r}")
        if self.bad_words is not None and (
            not isinstance(self.bad_words, list) or any(not isinstance(w, str) or not w.strip() for w in self.bad_words)
        ):
            raise bad(f"bad_words must be a list of non-empty strings, got {self.bad_words!r}")

    @property
    def num_sequences(self) -> int:
        """How many sequences the engine samples: best_of (of which the best n are returned) or n."""
        return self.best_of or self.n

    @property
    def needs_token_constraints(self) -> bool:
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words)

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _token_key(key):
    """A logit_bias key as a token id: an int stays, a decimal string ("50256") becomes its int; anything
    else is left for validate() to name."""
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    return key
