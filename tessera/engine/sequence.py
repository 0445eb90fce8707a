"""Per-sequence state: the tokens so far, how many have KV in the cache, and its blocks."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

import torch

from tessera.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion being generated. A request with n > 1 owns n sequences sharing the prompt."""

    seq_id: int
    request_id: str
    index: int  # which of the request's n completions this is
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    num_cached_prompt_tokens: int = 0  # of those, found in the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of its full, computed blocks
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None
    stop_token_set: frozenset[int] = frozenset()  # EOS (unless ignore_eos) and stop_token_ids
    max_total_tokens: int = 0  # prompt + max_tokens, capped at the context length
    logprobs: list = field(default_factory=list)
    cumulative_logprob: float = 0.0
    num_preemptions: int = 0
    first_token_time: float | None = None
    sparse: object = None  # a SparseConfig: decode with sparse KV retrieval (tessera.longctx.sparse)
    working_set: object = None  # its fast-tier copy of selected blocks' K/V; dropped with the blocks
    host_kv: object = None  # with offload, its slow tier: every position's K/V in host memory; likewise
    # Sparse: how much the prompt's end attends to each prompt position (tessera.longctx.sparse).
    prompt_observation: torch.Tensor | None = None
    # Next-token entropies of the last params.prompt_entropies prompt positions (NaN until computed).
    prompt_entropies: list[float] = field(default_factory=list)
    # With params.prompt_logprobs, on a request's first sequence only (the others share its prompt):
    # entry p is prompt token p + 1's {token_id: Logprob}, read off position p's row (None until computed).
    prompt_logprobs: list[dict | None] = field(default_factory=list)
    # The output text so far and its incremental decoder (tessera.engine.output_processor).
    text: str = ""
    detok: object = None
    # Its request's logit_bias / allowed_token_ids / bad_words as token ids (engine.token_constraints).
    constraints: object = None
    # With params.guided_decoding, its grammar matcher (tessera.engine.guided.GuidedState); dropped
    # when it finishes or is aborted.
    guided: object = None
    # With a tessera.lora.LoRARequest, the adapter its tokens run with (and its KV is cached under).
    lora_request: object = None
    # With several models on one engine (tessera.blockllm), the Variant it runs on (None: the first).
    variant: object = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        n = min(self.params.prompt_entropies, len(self.prompt_token_ids))
        self.prompt_entropies = [math.nan] * n
        if self.params.prompt_logprobs is not None and self.index == 0:
            self.prompt_logprobs = [None] * (len(self.prompt_token_ids) - 1)

    # Scored prompt positions: a position's row goes through the LM head while its chunk is prefilled
    # when its next-token entropy or the logprob of the prompt token after it is still wanted.
    def wants_entropy(self, position: int) -> bool:
        i = position - (self.num_prompt_tokens - len(self.prompt_entropies))
        return 0 <= i < len(self.prompt_entropies) and math.isnan(self.prompt_entropies[i])

    def wants_prompt_logprob(self, position: int) -> bool:
        return 0 <= position < len(self.prompt_logprobs) and self.prompt_logprobs[position] is None

    def scored_positions(self, start: int, end: int) -> list[int]:
        """The positions in [start, end) to score. Ones already scored (before a preemption) are left
        out, so a recompute never scores a position twice."""
        end = min(end, self.num_prompt_tokens)
        return [p for p in range(start, end) if self.wants_entropy(p) or self.wants_prompt_logprob(p)]

    @property
    def first_unscored_position(self) -> int:
        """The first prompt position still to be scored (num_tokens when none is)."""
        base = self.num_prompt_tokens - len(self.prompt_entropies)
        first = self.num_tokens
        for i, e in enumerate(self.prompt_entropies):
            if math.isnan(e):
                first = base + i
                break
        for p, lp in enumerate(self.prompt_logprobs):
            if lp is None:
                return min(first, p)
        return first

    @property
    def first_position_to_compute(self) -> int:
        """The first prompt position that must run through the model even when the prefix cache holds
        its K/V: it is still to be scored, or a sparse request has yet to observe it."""
        first = self.first_unscored_position
        sc = self.sparse
        if sc is not None and sc.observed_tokens and self.prompt_observation is None:
            first = min(first, max(self.num_prompt_tokens - sc.observe_window, 0))
        return first

    @property
    def lora_int_id(self) -> int:
        """Its adapter's id; 0 for the base model."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def cache_salt(self) -> int | None:
        """What its prefix-cache hash chain starts from: None for the base model, its adapter's salt."""
        if self.lora_request is not None:
            return self.lora_request.cache_salt
        return None if self.variant is None else self.variant.cache_salt

    @property
    def variant_index(self) -> int:
        """Its model's index among the engine's variants (tessera.blockllm); 0 for the first."""
        return 0 if self.variant is None else self.variant.index

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def num_tokens_to_schedule(self) -> int:
        """The most tokens the next step may compute for it. A sparse decode computed each generated
        token's K/V in a sparse step of its own; after preemption they are recomputed the same way,
        one per step, so preemption leaves the result unchanged."""
        n = self.num_uncomputed_tokens
        if self.sparse is None or self.num_tokens == self.num_prompt_tokens:
            return n
        if self.num_computed_tokens < self.num_prompt_tokens:
            return min(n, self.num_prompt_tokens - self.num_computed_tokens)
        return min(n, 1)

    @property
    def num_cacheable_tokens(self) -> int:
        """Its computed tokens whose K/V may enter the prefix cache: not a sparse decode's generated
        tokens, whose K/V approximates what a dense request reusing them would need."""
        if self.sparse is None:
            return self.num_computed_tokens
        return min(self.num_computed_tokens, self.num_prompt_tokens)

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED
