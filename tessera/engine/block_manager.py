"""The KV block pool: per-sequence block tables, reference counts and the automatic prefix cache.

A full block is identified by a hash chained over its token ids (xxh3-64 of the parent's hash and the
block's tokens); a sequence running with a LoRA adapter starts its chain from the adapter's salt, not
from nothing, so KV is never shared across adapters or with the base model. A cache hit is trusted only
after comparing the block's tokens and checking that its parent is the block just matched, in the same
generation (blocks are renumbered generations when they are reused), so a hash collision can never
splice a wrong prefix in. Freed blocks keep their contents and stay findable until the pool needs them;
the pool hands out the least recently freed first (LRU). Block 0 is reserved and zero-filled: padded
reads point there.
"""

from __future__ import annotations

import array
from collections import OrderedDict
from dataclasses import dataclass

import xxhash

from tessera.engine.sequence import Sequence

NULL_BLOCK = 0


def paged_slots(block_table: list[int], positions, block_size: int) -> list[int]:
    """The paged-pool slots (block id * block_size + offset) of a sequence's positions."""
    return [block_table[p // block_size] * block_size + p % block_size for p in positions]


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    generation: int = 0  # bumped every time the block is handed out afresh
    hash: int | None = None
    token_ids: tuple[int, ...] | None = None
    # (block_id, generation) of the previous block in the chain; a first block: None, or (-1, salt)
    # under a LoRA adapter (Sequence.cache_salt), so that even a hash collision cannot cross adapters.
    parent: tuple[int, int] | None = None


def chain_hash(parent_hash: int | None, token_ids) -> int:
    h = xxhash.xxh3_64(b"" if parent_hash is None else parent_hash.to_bytes(8, "little"))
    h.update(array.array("i", token_ids).tobytes())
    return h.intdigest()


def _root(seq: Sequence) -> tuple[int, int] | None:
    """The `parent` of a sequence's first block."""
    salt = seq.cache_salt
    return None if salt is None else (-1, salt)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least 2 blocks (block 0 is reserved)")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of those, found in the cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks) - 1  # usable ones

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    # -- admission ---------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Attach the cached blocks that hold a prefix of seq's tokens; returns the tokens covered.

        At least one token is always left to compute, so the step that admits seq yields logits, and
        so is every position that must be computed (Sequence.first_position_to_compute).
        """
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_blocks = min(seq.num_tokens - 1, seq.first_position_to_compute) // bs
        matched = self.cached_blocks(seq.token_ids, max_blocks, seq.cache_salt, _root(seq))
        for bid in matched:
            self._ref(bid)
        seq.block_table = matched
        seq.block_hashes = [self.blocks[bid].hash for bid in matched]  # commit() goes on from here
        seq.num_computed_tokens = seq.num_cached_prompt_tokens = len(matched) * bs
        return seq.num_computed_tokens

    def cached_blocks(self, token_ids, max_blocks: int, salt=None, root=None) -> list[int]:
        """The cached blocks holding token_ids' first full blocks, in order (at most max_blocks): the
        chain of hashes from `salt`, each block's parent checked from `root`. Read-only."""
        bs = self.block_size
        parent_hash, parent = salt, root
        matched: list[int] = []
        for i in range(max_blocks):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(parent_hash, tokens)
            bid = self.cached.get(h)
            if bid is None:
                break
            block = self.blocks[bid]
            if block.token_ids != tokens or block.parent != parent:
                break
            matched.append(bid)
            parent_hash, parent = h, (bid, block.generation)
        return matched

    def count_admission(self, seq: Sequence) -> None:
        """Hit-rate bookkeeping, once per admission (a sequence may be looked up several times
        before it fits)."""
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_prompt_tokens
            self.prefix_hits += min(seq.num_prompt_tokens, seq.num_cached_prompt_tokens)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give seq room for its next num_new_tokens tokens (caller checked can_allocate)."""
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take_free())

    # -- after a step ------------------------------------------------------------------------
    def commit(self, seq: Sequence) -> None:
        """Register seq's blocks that became full (and computed) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        n_full = seq.num_cacheable_tokens // bs
        start = len(seq.block_hashes)
        parent_hash = seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt
        for i in range(start, n_full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(parent_hash, tokens)
            seq.block_hashes.append(h)
            bid = seq.block_table[i]
            block = self.blocks[bid]
            if block.hash is None:
                prev = self.blocks[seq.block_table[i - 1]] if i else None
                block.hash, block.token_ids = h, tokens
                block.parent = (prev.block_id, prev.generation) if prev else _root(seq)
                holder = self.cached.get(h)
                # A holder whose parent has since been reused can never be matched again; left in
                # place it would shadow this (valid) block and every block after it.
                if holder is None or not self._chain_intact(holder):
                    self.cached[h] = bid
            parent_hash = h

    def free_seq(self, seq: Sequence) -> None:
        # Release the tail first so that LRU eviction takes a chain's leaves before its root.
        self.release_blocks(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.working_set = None  # a sparse decode's copy of K/V from those blocks (tessera.longctx.sparse)
        seq.host_kv = None  # and its host store (tessera.longctx.host_tier)

    # -- blocks held outside a sequence (tessera.engine.migration.KVCopy) -----------------------
    def take_blocks(self, n: int) -> list[int]:
        """n fresh blocks (caller checked num_free_blocks), owned by the caller until release_blocks."""
        return [self._take_free() for _ in range(n)]

    def release_blocks(self, block_table: list[int]) -> None:
        for bid in reversed(block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {bid} freed twice"
            if block.ref_count == 0:
                self.free[bid] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence holds (benchmarks start each run cold)."""
        for bid in self.free:
            block = self.blocks[bid]
            if block.hash is not None and self.cached.get(block.hash) == bid:
                del self.cached[block.hash]
            block.hash = block.token_ids = block.parent = None
            block.generation += 1  # cached children of this block become unreachable

    # -- internals ---------------------------------------------------------------------------
    def _chain_intact(self, bid: int) -> bool:
        parent = self.blocks[bid].parent
        return parent is None or parent[0] < 0 or self.blocks[parent[0]].generation == parent[1]

    def _ref(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self.free[bid]
        block.ref_count += 1

    def _take_free(self) -> int:
        bid, _ = self.free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None and self.cached.get(block.hash) == bid:
            del self.cached[block.hash]
        block.hash = block.token_ids = block.parent = None
        block.generation += 1
        block.ref_count = 1
        return bid

    def reset_prefix_stats(self) -> None:
        self.prefix_queries = self.prefix_hits = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
