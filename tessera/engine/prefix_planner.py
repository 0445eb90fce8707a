"""Global prefix planning for batches handed over whole (BatchLLM).

An LRU prefix cache only shares a prefix if the requests that share it happen to run close together.
Given the whole batch up front, we can do better:

1. Build a prefix tree over all prompts, in whole KV blocks (sharing only ever saves whole blocks).
2. Reduce it so that each request has ONE shared prefix, chosen to maximise the prefill saved,
   gain = sum over groups of (sharers - 1) x prefix length, by a dynamic program over the tree.
3. Order the groups so that each is admitted together (its prefix computed once, by its first
   member) and groups that share part of a prefix are adjacent; among siblings, and inside a group,
   requests with a high decode-to-prompt ratio go first, so that their decode tokens fill the steps
   alongside the prefill chunks of the requests behind them.

`plan_prefixes` is a pure function of the prompts; `PlannedAdmission` is the scheduler policy that
carries a plan out (hold a group's members back until its prefix blocks are committed, and admit by
KV memory, not by request count); `add_planned` puts a batch into an engine in plan order.
"""

from __future__ import annotations

import gc
import itertools
from array import array
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from weakref import WeakKeyDictionary

from tessera.engine.block_manager import BlockManager
from tessera.engine.scheduler import ADMIT, SKIP, STOP, AdmissionPolicy, Scheduler
from tessera.engine.sequence import Sequence


@dataclass(frozen=True)
class PrefixGroup:
    prefix_len: int  # tokens shared by every member, a multiple of the block size; 0: none
    members: tuple[int, ...]  # request indices, in admission order


@dataclass(frozen=True)
class PrefixPlan:
    groups: tuple[PrefixGroup, ...]  # in admission order
    gain: int  # prefill tokens saved: sum of (sharers - 1) x prefix_len, sharers counted with weights

    @property
    def order(self) -> list[int]:
        return [r for g in self.groups for r in g.members]

    def prefix_lens(self, num_requests: int) -> list[int]:
        out = [0] * num_requests
        for g in self.groups:
            for r in g.members:
                out[r] = g.prefix_len
        return out


class _Node:
    __slots__ = ("depth", "ends", "kids", "anc")

    def __init__(self, depth: int):
        self.depth = depth  # in blocks
        self.ends: list[int] = []  # requests whose longest shareable prefix ends here
        self.kids: list[_Node] = []
        self.anc: list[int] = []  # depths of the ancestors, root (0) first


def _build_tree(prompts: Seq[Seq[int]], block_size: int) -> tuple[_Node, list[_Node]]:
    """The block trie of the prompts' shareable prefixes (every block but the one holding the last
    token), compressed to the nodes where a request ends or paths branch: opening a node inside a
    chain is never better than opening the chain's last node (same sharers, shorter prefix). Built
    from the prompts in sorted order and the common prefixes of neighbours, so it takes O(requests)
    nodes however long the prompts are. Returns the root and the nodes in pre-order."""
    bs = block_size
    shareable = [(len(p) - 1) // bs for p in prompts]
    # Each shareable prefix as bytes: sorting and comparing them runs at memcmp speed. Any
    # lexicographic order keeps the prompts that share a prefix next to each other.
    keys = [array("i", p[: m * bs]).tobytes() for p, m in zip(prompts, shareable, strict=True)]
    width = 4 * bs

    def common_blocks(a: bytes, b: bytes, hi: int) -> int:
        lo = 0
        while lo < hi:  # binary search over whole-slice comparisons
            mid = (lo + hi + 1) // 2
            if a[: mid * width] == b[: mid * width]:
                lo = mid
            else:
                hi = mid - 1
        return lo

    root = _Node(0)
    stack = [root]  # the path from the root to the last node added
    prev = None
    for r in sorted(range(len(prompts)), key=keys.__getitem__):
        m = shareable[r]
        depth = 0 if prev is None else common_blocks(keys[prev], keys[r], min(m, shareable[prev]))
        last = None
        while stack[-1].depth > depth:
            last = stack.pop()
            if stack[-1].depth >= depth:
                stack[-1].kids.append(last)
                last = None
        if last is not None:  # the paths branch inside the edge above `last`
            mid = _Node(depth)
            mid.kids.append(last)
            stack.append(mid)
        if m > stack[-1].depth:
            stack.append(_Node(m))
        stack[-1].ends.append(r)
        prev = r
    while len(stack) > 1:
        node = stack.pop()
        stack[-1].kids.append(node)
    order, todo = [], [root]
    while todo:
        node = todo.pop()
        order.append(node)
        for kid in node.kids:
            kid.anc = node.anc + [node.depth]
        todo.extend(reversed(node.kids))
    return root, order


def plan_prefixes(
    prompts: Seq[Seq[int]], max_tokens: Seq[int] | None, block_size: int, weights: Seq[int] | None = None
) -> PrefixPlan:
    """Plan a batch: each request gets one shared prefix (block-aligned, shorter than its prompt) and
    a place in the admission order. `max_tokens` (new tokens per request) only affects the order;
    `weights` counts a request with n completions as n sharers."""
    paused = gc.isenabled()
    gc.disable()  # the tree is acyclic; collections triggered by its many small objects only cost time
    try:
        return _plan(prompts, max_tokens, block_size, weights)
    finally:
        if paused:
            gc.enable()


def _plan(prompts: Seq[Seq[int]], max_tokens: Seq[int] | None, block_size: int, weights: Seq[int] | None) -> PrefixPlan:
    n = len(prompts)
    w = list(weights) if weights is not None else [1] * n
    out = list(max_tokens) if max_tokens is not None else [0] * n
    bs = block_size
    root, nodes = _build_tree(prompts, bs)

    # DP, bottom-up. A request takes the deepest "opened" node on its path (the root is always open,
    # at length 0); opening node v costs its length once (its prefix is computed by one member) and
    # every request that takes it gains that length. best[v][j]: the best gain inside v's subtree when
    # the deepest open ancestor of v is its j-th compressed ancestor; opens[v][j]: whether v opens.
    best: dict[int, list[int]] = {}
    opens: dict[int, list[bool]] = {}
    for v in reversed(nodes):
        ends_w = sum(w[r] for r in v.ends)
        kid_rows = [best.pop(id(k)) for k in v.kids]
        if v is root:
            best[id(v)] = [sum(row[0] for row in kid_rows)]
            continue
        length = v.depth * bs
        me = len(v.anc)  # v's own index in its children's ancestor lists
        open_gain = (ends_w - 1) * length + sum(row[me] for row in kid_rows)
        row, flags = [], []
        for j, anc_depth in enumerate(v.anc):
            closed = ends_w * anc_depth * bs + sum(kr[j] for kr in kid_rows)
            flags.append(open_gain > closed)
            row.append(max(open_gain, closed))
        best[id(v)], opens[id(v)] = row, flags
    gain = best[id(root)][0]

    # Top-down: which node each request takes. members[id(v)] collects the requests that take v.
    members: dict[int, list[int]] = {id(root): list(root.ends)}
    stack = [(k, 0, root) for k in root.kids]  # (node, index of the open ancestor, that ancestor)
    while stack:
        v, j, taker = stack.pop()
        if opens[id(v)][j]:
            j, taker = len(v.anc), v
        members.setdefault(id(taker), []).extend(v.ends)
        stack.extend((k, j, taker) for k in v.kids)

    def ratio(rs: Seq[int]) -> float:  # decode-to-prompt ratio of a set of requests
        return sum(out[r] for r in rs) / max(1, sum(len(prompts[r]) for r in rs))

    def group(v: _Node, rs: list[int]) -> PrefixGroup:
        rs = sorted(rs, key=lambda r: (-out[r] / max(1, len(prompts[r])), r))
        return PrefixGroup(v.depth * bs, tuple(rs))

    # Order, bottom-up: a subtree emits its own group first (its prefix stays hot for the groups
    # below, which extend it), then its child subtrees, decode-heavy first.
    emitted: dict[int, list[PrefixGroup]] = {}
    for v in reversed(nodes):
        units = [emitted.pop(id(k)) for k in v.kids]
        own = members.get(id(v), [])
        if v is root:  # requests that share nothing are units of their own
            units += [[PrefixGroup(0, (r,))] for r in own]
            own = []
        units = [u for u in units if u]
        units.sort(key=lambda u: (-ratio([r for g in u for r in g.members]), min(r for g in u for r in g.members)))
        emitted[id(v)] = ([group(v, own)] if own else []) + [g for u in units for g in u]
    return PrefixPlan(tuple(emitted[id(root)]), gain)


class PlannedAdmission(AdmissionPolicy):
    """Carries out a plan. The waiting queue holds the plan's order; a member of a group whose prefix
    another member is still computing is skipped (it would recompute the prefix) while the sequences
    behind it may go in, but its blocks are set aside for it. Admission is sized by KV memory: a
    sequence goes in only if the pool can hold everything it may grow to (prompt + max_tokens)
    besides what the running sequences may still grow to, so a planned batch never preempts."""

    def __init__(self) -> None:
        self.groups: WeakKeyDictionary[Sequence, tuple[int, int]] = WeakKeyDictionary()  # (group, prefix)
        self._keys = itertools.count()
        self.bm: BlockManager | None = None
        self.held = 0  # blocks promised to running and skipped sequences
        self.busy: set[int] = set()  # groups whose prefix a running member is computing

    def assign(self, seqs: Seq[Sequence], prefix_len: int) -> None:
        """Make seqs one sharing group (prefix_len tokens shared)."""
        key = next(self._keys)
        for seq in seqs:
            self.groups[seq] = (key, prefix_len)

    def _future(self, seq: Sequence) -> int:
        bs = self.bm.block_size
        return max(0, -(-seq.max_total_tokens // bs) - len(seq.block_table))

    def start_step(self, scheduler: Scheduler) -> None:
        self.bm = scheduler.bm
        self.held = sum(self._future(s) for s in scheduler.running)
        self.busy = set()
        for s in scheduler.running:
            g = self.groups.get(s)
            if g is not None and s.num_computed_tokens < g[1]:
                self.busy.add(g[0])

    def verdict(self, seq: Sequence) -> int:
        g = self.groups.get(seq)
        if g is None or g[0] not in self.busy:
            return ADMIT
        # Set its own (unshared) blocks aside, so that later groups cannot take them.
        self.held += max(0, -(-seq.max_total_tokens // self.bm.block_size) - g[1] // self.bm.block_size)
        return SKIP if self.held < self.bm.num_free_blocks else STOP

    def fits(self, bm: BlockManager, seq: Sequence, num_new_tokens: int) -> bool:
        return self._future(seq) + self.held <= bm.num_free_blocks

    def admitted(self, seq: Sequence) -> None:
        self.held += self._future(seq)
        g = self.groups.get(seq)
        if g is not None and seq.num_computed_tokens < g[1]:
            self.busy.add(g[0])


def add_planned(
    engine, items: Seq[tuple[str | None, list[int], object, str | None]], policy: PlannedAdmission,
    loras: Seq[object] | None = None, models: Seq[str | None] | None = None,
) -> list[str]:
    """Add a batch to `engine` in plan order. items: (prompt text or None, prompt token ids, params,
    request id or None), already validated; loras: each item's tessera.LoRARequest or None. Requests on
    different adapters never share KV (tessera.engine.block_manager), so each adapter's requests are
    planned on their own, one plan after another; so are those on different models (models: each item's
    model name with several models on the engine, tessera.blockllm). Returns the request ids in the
    order of items."""
    loras = list(loras) if loras is not None else [None] * len(items)
    models = list(models) if models is not None else [None] * len(items)
    by_adapter: dict[tuple, list[int]] = {}
    for r, (lr, m) in enumerate(zip(loras, models, strict=True)):
        by_adapter.setdefault((0 if lr is None else lr.lora_int_id, m), []).append(r)
    rids: list[str | None] = [None] * len(items)
    for members in by_adapter.values():
        part = [items[r] for r in members]
        prompts = [ids for _, ids, _, _ in part]
        new_tokens = [engine.check_request(ids, sp) - len(ids) for _, ids, sp, _ in part]
        plan = plan_prefixes(prompts, new_tokens, engine.config.block_size, [sp.num_sequences for _, _, sp, _ in part])
        for g in plan.groups:
            seqs = []
            for m in g.members:
                r = members[m]
                text, ids, sp, rid = items[r]
                rids[r] = engine.add_request(text, sp, request_id=rid, prompt_token_ids=ids, lora_request=loras[r],
                                             model=models[r])
                seqs += engine.requests[rids[r]].seqs
            if g.prefix_len:
                policy.assign(seqs, g.prefix_len)
    return rids
