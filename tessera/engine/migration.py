"""Moving a request between engines: its tokens, its sampling state and the K/V of its computed tokens.

A fleet (tessera/fleet) moves requests between instances: after a prefill (a prefill/decode split),
to a partner that already holds a copy (AcceLLM pairs), or, when an instance dies, to one that recomputes
what it has no copy of. Three pieces make that possible, used through LLMEngine's small API
(`export_request`, `detach_request`, `adopt_request`):

- `SeqState`: what a sequence is, apart from where its K/V lives (plain data: it crosses processes);
- `read_kv` / `write_kv`: K/V rows of positions [start, end) out of / into the paged pool, every layer;
- `KVCopy`: K/V held for a sequence outside the scheduler (a partner's redundant copy), grown row by row
  as the running side computes them, dropped first when the pool runs short, adopted without a copy.

A sequence adopted with K/V for its first k tokens computes only the rest; adopted with none, it is
recomputed from its tokens, which gives the same result (as after a preemption).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tessera.engine.block_manager import BlockManager, paged_slots
from tessera.sampling_params import SamplingParams


@dataclass
class SeqState:
    """One sequence of a request (requests with n == 1 move), as the engine that ran it left it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    logprobs: list = field(default_factory=list)
    cumulative_logprob: float = 0.0
    generator_state: torch.Tensor | None = None  # a seeded request's RNG, so sampling goes on as it would have
    kv: torch.Tensor | None = None  # [layers, 2, num_kv, kv_heads, head_dim]: K/V of the first num_kv tokens
    arrival_time: float | None = None
    first_token_time: float | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_kv(self) -> int:
        return 0 if self.kv is None else self.kv.shape[2]


def _flat_pool(kv_cache: torch.Tensor) -> torch.Tensor:
    """The pool [layers, 2, blocks, block_size, heads, dim] as [layers, 2, slots, heads, dim] (a view)."""
    L, two, nb, bs, h, d = kv_cache.shape
    return kv_cache.view(L, two, nb * bs, h, d)


def read_kv(kv_cache: torch.Tensor, block_table: list[int], start: int, end: int) -> torch.Tensor:
    """K/V rows of positions [start, end), every layer, as a contiguous CPU tensor [L, 2, n, heads, dim]."""
    bs = kv_cache.shape[3]
    slots = torch.tensor(paged_slots(block_table, range(start, end), bs), dtype=torch.long, device=kv_cache.device)
    return _flat_pool(kv_cache).index_select(2, slots).cpu()


def write_kv(kv_cache: torch.Tensor, block_table: list[int], start: int, rows: torch.Tensor) -> None:
    """Write rows [L, 2, n, heads, dim] at positions [start, start + n) of a sequence's blocks."""
    bs = kv_cache.shape[3]
    n = rows.shape[2]
    slots = torch.tensor(paged_slots(block_table, range(start, start + n), bs), dtype=torch.long,
                         device=kv_cache.device)
    _flat_pool(kv_cache).index_copy_(2, slots, rows.to(kv_cache.device, kv_cache.dtype))


@dataclass(eq=False)
class KVCopy:
    """A redundant copy of one request's K/V, kept in this engine's pool but not scheduled: its rows are
    written as the instance that runs the request sends them (`extend`), so that this engine can take
    the request over (`LLMEngine.adopt_request(state, copy)`) without recomputing or copying anything."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)  # the tokens whose rows it holds, and the ones after
    block_table: list[int] = field(default_factory=list)
    num_rows: int = 0

    def extend(self, bm: BlockManager, kv_cache: torch.Tensor, token_ids: list[int], start: int,
               rows: torch.Tensor) -> bool:
        """Take rows for positions [start, start + n). Rows must follow on (start <= num_rows); the
        tokens they were computed from must agree with the ones held. False when the pool has no room:
        the caller drops a copy (this one, or another) and may retry."""
        if start > self.num_rows or token_ids[:start] != self.token_ids[:start]:
            raise ValueError(f"request {self.request_id}: K/V rows from position {start} do not follow the "
                             f"{self.num_rows} rows held")
        end = start + rows.shape[2]
        if not self._reserve(bm, end):
            return False
        write_kv(kv_cache, self.block_table, start, rows)
        self.num_rows = max(self.num_rows, end)
        self.token_ids = list(token_ids)
        return True

    def extend_layer(self, bm: BlockManager, kv_cache: torch.Tensor, token_ids: list[int], layer: int, start: int,
                     rows: torch.Tensor) -> bool:
        """One layer's rows [2, n, heads, dim] for positions [start, start + n), or consecutive layers' from
        `layer` on [layers, 2, n, heads, dim], sent as the layers computed them; the positions count as held
        once the last layer's rows are in. False: no room (as extend)."""
        if rows.dim() == 4:
            rows = rows.unsqueeze(0)
        if start != self.num_rows or token_ids[:start] != self.token_ids[:start]:
            raise ValueError(f"request {self.request_id}: layer {layer} rows from position {start} do not follow "
                             f"the {self.num_rows} rows held")
        end = start + rows.shape[2]
        if not self._reserve(bm, end):
            return False
        last = layer + rows.shape[0]
        write_kv(kv_cache[layer:last], self.block_table, start, rows)
        if last == kv_cache.shape[0]:
            self.num_rows, self.token_ids = end, list(token_ids)
        return True

    def _reserve(self, bm: BlockManager, end: int) -> bool:
        """Blocks for positions [0, end) in the block table; False (nothing taken) when the pool lacks them."""
        need = -(-end // bm.block_size) - len(self.block_table)
        if need > bm.num_free_blocks:
            return False
        self.block_table += bm.take_blocks(need)
        return True

    def release(self, bm: BlockManager) -> None:
        bm.release_blocks(self.block_table)
        self.block_table = []
        self.num_rows = 0
