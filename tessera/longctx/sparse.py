"""Sparse KV retrieval for long decodes (SpeContext): a retrieval head picks the KV positions once per
step, every later layer attends only to them, and only the positions whose selection changed are
fetched from the slow tier into a small fast working set, layer by layer, ahead of the compute.

Tiers. The slow tier is the paged KV pool, which holds every position of every layer. The fast tier is
one working set per sequence: `budget` slots per sparse layer, each slot holding the K/V of one
selected position. On a GPU the working sets are device memory; on a CPU-only machine both tiers are
host pools, and the same code path runs (that is what the tests cover).

The retrieval head is the model's own first `retrieval_layers` layers: they run dense, and the last of
them scores every cached position by its attention probability for the token being decoded (the
largest over the heads). The sinks (first tokens), the recent window and the top-k of the rest form the
selection, the same for every sparse layer. The new token's own K/V is attended to directly.

Part of the top-k is fixed when the prompt is prefilled (PromptObserver, SnapKV's observation window):
the positions the prompt's last tokens attend to most, at any layer and head. They hold what a question
at the prompt's end asks about, which a shallow retrieval layer scores no higher than its neighbours.

Fetches run on a worker thread (on a CUDA side stream for GPU tiers): layer l's copies overlap layer
l-1's compute; layer l waits only for its own copies.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tessera.engine.block_manager import paged_slots
from tessera.longctx.config import SparseConfig


@dataclass
class SparseStats:
    steps: int = 0  # sequence-steps decoded sparsely
    selected: int = 0  # positions selected, summed over sequence-steps
    fetched: int = 0  # positions copied into a working set (per layer), summed over sequence-steps
    context: int = 0  # cached positions available, summed over sequence-steps
    recall_hits: int = 0  # with measure_recall: selected positions among the dense top-k
    recall_total: int = 0
    mass_covered: float = 0.0  # with measure_recall: dense attention probability on selected positions
    mass_samples: int = 0

    def as_dict(self) -> dict:
        d = {"steps": self.steps, "selected_per_step": self.selected / max(self.steps, 1),
             "fetched_per_step": self.fetched / max(self.steps, 1),
             "fetched_fraction": self.fetched / max(self.context, 1),
             "selected_fraction": self.selected / max(self.context, 1)}
        if self.recall_total:
            d["recall"] = self.recall_hits / self.recall_total
            d["attention_mass_covered"] = self.mass_covered / max(self.mass_samples, 1)
        return d


class WorkingSet:
    """One sequence's fast tier: slot -> position, and the K/V of those positions for each sparse layer,
    head-major ([layer, head, slot, dim]) so that attention reads a layer's slots in place.

    Selections never shrink (the whole context while it fits, then a fixed budget) and the lowest free
    slot is always handed out first, so the occupied slots are always [0, n): the slot after them is
    free for the token being decoded."""

    def __init__(self, num_layers: int, budget: int, num_kv_heads: int, head_dim: int, dtype, device):
        self.k = torch.zeros(num_layers, num_kv_heads, budget, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slot_pos = [-1] * budget
        self.pos_slot: dict[int, int] = {}
        self.free = list(range(budget - 1, -1, -1))  # a stack: the lowest slot is handed out first

    def update(self, selection: list[int]) -> tuple[list[int], list[int]]:
        """Make the slots hold exactly `selection` (sorted positions). Returns the (slots, positions)
        that must be fetched: only the positions not held already."""
        wanted = set(selection)
        for pos in [p for p in self.pos_slot if p not in wanted]:
            slot = self.pos_slot.pop(pos)
            self.slot_pos[slot] = -1
            self.free.append(slot)
        self.free.sort(reverse=True)
        slots, positions = [], []
        for pos in selection:
            if pos not in self.pos_slot:
                slot = self.free.pop()
                self.pos_slot[pos], self.slot_pos[slot] = slot, pos
                slots.append(slot)
                positions.append(pos)
        return slots, positions


class SparseKV:
    """Owns the fetch worker and the statistics; builds each step's plan. A working set lives on its
    sequence and is dropped with the sequence's blocks (BlockManager.free_seq): on finish, abort or
    preemption."""

    def __init__(self, model_cfg, kv_caches: list, block_size: int, dtype, device):
        self.cfg = model_cfg
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.dtype, self.device = dtype, device
        self.stats = SparseStats()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tessera-kv-fetch")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def reset_stats(self) -> None:
        self.stats = SparseStats()

    def plan(self, seqs: list, rows: slice) -> SparseStep:
        for seq in seqs:
            if seq.working_set is None:
                sc: SparseConfig = seq.sparse
                # Slots for every layer but the first: a step shared with requests that keep fewer layers
                # dense makes more of this sequence's layers sparse (the step takes the smallest depth).
                seq.working_set = WorkingSet(max(self.cfg.num_layers - 1, 1), sc.budget, self.cfg.num_kv_heads,
                                             self.cfg.head_dim, self.dtype, self.device)
        return SparseStep(self, seqs, [s.working_set for s in seqs], rows)


@dataclass
class ObservedChunk:
    seq: object
    rows: slice  # rows of the flat batch: prompt positions inside the observation window
    first_position: int  # the position of rows.start


class PromptObserver:
    """While sparse requests prefill the end of their prompts: every layer scores each earlier position
    by its largest attention probability from the window's queries (over heads and queries), and
    `seq.prompt_observation` keeps the largest over layers. A window split over prefill chunks is
    observed chunk by chunk: each query sees exactly the positions it attends to."""

    def __init__(self, chunks: list[ObservedChunk], block_size: int, device):
        self.chunks = chunks
        # Per chunk, built once for all layers: the slots of the keys its queries see, [0, end), and
        # which of them each query may attend to.
        self.keys: list[tuple[torch.Tensor, torch.Tensor]] = []
        for c in chunks:
            end = c.first_position + c.rows.stop - c.rows.start
            slots = torch.tensor(paged_slots(c.seq.block_table, range(end), block_size), dtype=torch.long,
                                 device=device)
            query_pos = torch.arange(c.first_position, end, device=device)
            self.keys.append((slots, torch.arange(end, device=device)[None, :] <= query_pos[:, None]))

    @staticmethod
    def chunk(seq, first_row: int, start: int, num_new: int) -> ObservedChunk | None:
        """The part of a prefill chunk (positions [start, start + num_new) at rows from first_row) that
        lies in seq's observation window, if any."""
        sc = seq.sparse
        if sc is None or not sc.observed_tokens:
            return None
        lo = max(start, seq.num_prompt_tokens - sc.observe_window)
        hi = min(start + num_new, seq.num_prompt_tokens)
        if lo >= hi:
            return None
        return ObservedChunk(seq, slice(first_row + lo - start, first_row + hi - start), lo)

    def record(self, q: torch.Tensor, k_cache: torch.Tensor, scale: float) -> None:
        """q: [T, Hq, D] of the whole flat batch at one layer, whose K is already in the paged cache."""
        hkv, d = k_cache.shape[-2:]
        for c, (slots, causal) in zip(self.chunks, self.keys, strict=True):
            seq, n = c.seq, c.rows.stop - c.rows.start
            keys = k_cache.view(-1, hkv, d).index_select(0, slots).float()
            qg = q[c.rows].float().view(n, hkv, -1, d)
            logits = torch.einsum("nhgd,phd->hgnp", qg, keys) * scale
            probs = logits.masked_fill(~causal, float("-inf")).softmax(-1).amax((0, 1, 2))
            if seq.prompt_observation is None:
                seq.prompt_observation = torch.zeros(seq.num_prompt_tokens, device=q.device)
            seen = seq.prompt_observation[: slots.numel()]
            torch.maximum(seen, probs, out=seen)


def observed_positions(seq, lo: int, hi: int, k: int) -> torch.Tensor:
    """The top-k positions in [lo, hi) by seq's (max-pooled) prompt observation; empty without one."""
    obs = seq.prompt_observation
    hi = min(hi, 0 if obs is None else obs.numel())
    if obs is None or k <= 0 or hi <= lo:
        return torch.empty(0, dtype=torch.long)
    pool = seq.sparse.observe_pool
    pooled = F.max_pool1d(obs[None, None], pool, stride=1, padding=pool // 2)[0, 0]
    return torch.topk(pooled[lo:hi], min(k, hi - lo)).indices.add_(lo).cpu()


@dataclass
class SparseStep:
    """One step's sparse decodes: rows of the flat batch, their selections and in-flight fetches."""

    owner: SparseKV
    seqs: list
    sets: list[WorkingSet]
    rows: slice
    dense_meta: object = None  # the step's metadata without the sparse rows (set by the runner)
    retrieval_layers: int = field(init=False)
    _fetches: dict[int, Future] = field(default_factory=dict)
    _sizes: list[int] = field(default_factory=list)  # per sequence: its occupied slots, [0, n)

    def __post_init__(self) -> None:
        # One retrieval depth per step: the shallowest any of its sequences asks for.
        self.retrieval_layers = min(min(s.sparse.retrieval_layers for s in self.seqs),
                                    self.owner.cfg.num_layers)

    @property
    def measure(self) -> bool:
        return any(s.sparse.measure_recall for s in self.seqs)

    def is_sparse_layer(self, layer: int) -> bool:
        return layer >= self.retrieval_layers

    # -- retrieval: after the last dense layer's attention ---------------------------------------------
    def select(self, layer: int, q: torch.Tensor) -> None:
        """q: [B, Hq, D] of the sparse rows at the retrieval layer (whose K is in the paged cache)."""
        owner = self.owner
        k_cache = owner.kv_caches[layer][0]
        hkv, d = k_cache.shape[-2:]
        group = q.shape[1] // hkv
        bs = owner.block_size
        fetch_plan = []
        for b, (seq, ws) in enumerate(zip(self.seqs, self.sets, strict=True)):
            sc: SparseConfig = seq.sparse
            p = seq.num_computed_tokens  # the position being decoded; [0, p) is cached
            budget = sc.budget - 1  # one slot's worth is the new token, attended to directly
            if p <= budget:
                selection = list(range(p))
            else:
                lo, hi = min(sc.sink_tokens, p), max(p - sc.recent_tokens, 0)
                middle: set[int] = set()
                if hi > lo:
                    k = min(sc.top_k, hi - lo)
                    fixed = observed_positions(seq, lo, hi, min(sc.observed_tokens, k))
                    scores = self._scores(seq, q[b], k_cache, group, d, 0, p)
                    scores[fixed.to(scores.device)] = float("-inf")  # already in: the head picks others
                    dynamic = torch.topk(scores[lo:hi], k - fixed.numel()).indices.add_(lo).cpu()
                    middle = set(fixed.tolist()) | set(dynamic.tolist())
                selection = sorted(set(range(lo)) | set(range(hi, p)) | middle)
            slots, positions = ws.update(selection)
            fetch_plan.append((ws, slots, paged_slots(seq.block_table, positions, bs)))
            st = owner.stats
            st.steps += 1
            st.selected += len(selection)
            st.fetched += len(positions)
            st.context += p
            n = len(selection)
            assert ws.slot_pos[n] < 0 and (n == 0 or ws.slot_pos[n - 1] >= 0)  # occupied: [0, n)
            self._sizes.append(n)
        self._start_fetches(fetch_plan)

    def _probs(self, seq, q: torch.Tensor, k_cache: torch.Tensor, group: int, d: int, lo: int, hi: int):
        """Attention probabilities [Hq, hi - lo] of the decoded token over cached positions [lo, hi)."""
        slots = torch.tensor(paged_slots(seq.block_table, range(lo, hi), self.owner.block_size),
                             dtype=torch.long, device=k_cache.device)
        keys = k_cache.view(-1, *k_cache.shape[-2:]).index_select(0, slots)
        hkv = keys.shape[1]
        logits = torch.einsum("hgd,phd->hgp", q.view(hkv, group, d).float(), keys.float()) * d**-0.5
        return logits.softmax(-1).flatten(0, 1)

    def _scores(self, seq, q, k_cache, group: int, d: int, lo: int, hi: int) -> torch.Tensor:
        """A position's score is its largest probability over the heads: retrieval is the work of a few
        heads, and a mean over all of them would drown those in the heads that look nearby."""
        return self._probs(seq, q, k_cache, group, d, lo, hi).amax(0)

    def _start_fetches(self, plan) -> None:
        owner = self.owner
        index = [(ws, torch.tensor(slots, dtype=torch.long, device=owner.device),
                  torch.tensor(paged, dtype=torch.long, device=owner.device)) for ws, slots, paged in plan if slots]
        if not index:
            return
        stream = owner._stream
        ready = None
        if stream is not None:  # the side stream must see every K/V the compute stream has written
            ready = torch.cuda.Event()
            ready.record()

        def fetch(layer: int) -> None:
            k_cache, v_cache = owner.kv_caches[layer]
            hkv, d = k_cache.shape[-2:]
            li = layer - 1
            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx, torch.inference_mode():  # inference mode is per thread
                if ready is not None:
                    stream.wait_event(ready)
                for ws, slots, paged in index:
                    ws.k[li].index_copy_(1, slots, k_cache.view(-1, hkv, d).index_select(0, paged).transpose(0, 1))
                    ws.v[li].index_copy_(1, slots, v_cache.view(-1, hkv, d).index_select(0, paged).transpose(0, 1))
            if stream is not None:
                stream.synchronize()

        for layer in range(self.retrieval_layers, owner.cfg.num_layers):
            # queued in layer order: layer l is copied while layer l-1 computes
            self._fetches[layer] = owner._pool.submit(fetch, layer)

    # -- attention of a sparse layer ----------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q: [B, Hq, D]; k, v: [B, Hkv, D] of the new tokens. Attends over each working set + itself,
        in place: the new token goes into the slot after the occupied ones."""
        fut = self._fetches.pop(layer, None)
        if fut is not None:
            fut.result()
        li = layer - 1
        B, hq, d = q.shape
        hkv = k.shape[1]
        out = torch.empty_like(q)
        for b, (ws, n) in enumerate(zip(self.sets, self._sizes, strict=True)):
            ws.k[li, :, n] = k[b]
            ws.v[li, :, n] = v[b]
            o = F.scaled_dot_product_attention(q[b].view(hkv, hq // hkv, d), ws.k[li, :, : n + 1],
                                               ws.v[li, :, : n + 1], scale=scale)
            out[b] = o.reshape(hq, d)
        return out

    def measure_recall(self, layer: int, q: torch.Tensor) -> None:
        """Diagnostics: how much of this layer's dense attention the selection holds: recall of the dense
        top-|selection| positions and the attention probability on the selected ones (mean over heads)."""
        k_cache = self.owner.kv_caches[layer][0]
        hkv, d = k_cache.shape[-2:]
        st = self.owner.stats
        for b, (seq, ws) in enumerate(zip(self.seqs, self.sets, strict=True)):
            p = seq.num_computed_tokens
            if p == 0:
                continue
            probs = self._probs(seq, q[b], k_cache, q.shape[1] // hkv, d, 0, p).mean(0)
            selected = torch.tensor([pos for pos in ws.slot_pos if pos >= 0], dtype=torch.long)
            n = selected.numel()
            top = set(torch.topk(probs, n).indices.tolist())
            st.recall_hits += len(top & set(selected.tolist()))
            st.recall_total += n
            st.mass_covered += float(probs.cpu()[selected].sum())
            st.mass_samples += 1

    def finish(self) -> None:
        for fut in self._fetches.values():  # never leave a fetch running past its step
            fut.result()
        self._fetches.clear()

