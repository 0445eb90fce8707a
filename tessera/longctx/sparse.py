"""Sparse KV retrieval for long decodes (SpeContext): a retrieval head picks the KV positions once per
step, every later layer attends only to them, and only the positions whose selection changed are
fetched from the slow tier into a small fast working set, layer by layer, ahead of the compute.

Tiers. The fast tier is one working set per sequence, in the model's device memory: `budget` slots per
sparse layer, each slot holding the K/V of one selected position. The slow tier holds every position of
every layer: with offload (SparseConfig.offload, on by default when the model runs on a GPU) a host
store per sequence (tessera.longctx.host_tier), page-locked, filled from the paged pool a step behind;
without, the paged KV pool itself. On a CPU-only machine offload runs the same path between two host
pools, which is what its tests cover.

The retrieval head is the model's own first `retrieval_layers` layers: they run dense, and the last of
them scores every cached position by its attention probability for the token being decoded (the
largest over the heads). The sinks (first tokens), the recent window and the top-k of the rest form the
selection, the same for every sparse layer. The new token's own K/V is attended to directly.

Part of the top-k is fixed when the prompt is prefilled (PromptObserver, SnapKV's observation window):
the positions the prompt's last tokens attend to most, at any layer and head. They hold what a question
at the prompt's end asks about, which a shallow retrieval layer scores no higher than its neighbours.

Copies are queued layer by layer ahead of the compute: on a GPU on a side stream, one event per layer,
which the compute stream waits for (the CPU never blocks on them); on a CPU on a worker thread, whose
future the layer waits for. Either way layer l's spill and copies overlap layer l-1's compute. Positions
the device gained since the last step (the prompt at the first step, then the token decoded last) are
copied into the working set from the device's paged pool while they are spilled; the rest come from
the host store.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tessera.engine.block_manager import paged_slots
from tessera.longctx.config import SparseConfig
from tessera.longctx.host_tier import HostStore


@dataclass
class SparseStats:
    steps: int = 0  # sequence-steps decoded sparsely
    selected: int = 0  # positions selected, summed over sequence-steps
    fetched: int = 0  # positions copied into a working set (per layer), summed over sequence-steps
    spilled: int = 0  # with offload: positions copied to the host store (per layer), summed likewise
    fetched_from_host: int = 0  # with offload: the part of `fetched` read from the host store
    context: int = 0  # cached positions available, summed over sequence-steps
    recall_hits: int = 0  # with measure_recall: selected positions among the dense top-k
    recall_total: int = 0
    mass_covered: float = 0.0  # with measure_recall: dense attention probability on selected positions
    mass_samples: int = 0

    def as_dict(self) -> dict:
        d = {"steps": self.steps, "selected_per_step": self.selected / max(self.steps, 1),
             "fetched_per_step": self.fetched / max(self.steps, 1),
             "fetched_fraction": self.fetched / max(self.context, 1),
             "spilled_per_step": self.spilled / max(self.steps, 1),
             "fetched_from_host_per_step": self.fetched_from_host / max(self.steps, 1),
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
        self._observed: tuple = (None, None)  # (arguments, result) of the last observed_positions call

    def observed(self, seq, lo: int, hi: int, k: int) -> torch.Tensor:
        """observed_positions(seq, lo, hi, k), recomputed only when its answer can change: the
        observation covers the prompt, which the recent window leaves behind after a few steps."""
        n = 0 if seq.prompt_observation is None else seq.prompt_observation.numel()
        key = (lo, min(hi, n), k)
        if self._observed[0] != key:
            self._observed = (key, observed_positions(seq, lo, hi, k))
        return self._observed[1]

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
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tessera-kv-fetch") if self._stream is None else None
        self.last_spill: torch.cuda.Event | None = None  # a host store is read or grown only after it

    def reset_stats(self) -> None:
        self.stats = SparseStats()

    def offloads(self, sc: SparseConfig) -> bool:
        return sc.offload if sc.offload is not None else self.device.type == "cuda"

    def plan(self, seqs: list, rows: slice) -> SparseStep:
        if self.last_spill is not None:
            self.last_spill.synchronize()  # long done: it ran beside the last step's layers
            self.last_spill = None
        for seq in seqs:
            if seq.working_set is None:
                sc: SparseConfig = seq.sparse
                # Slots for every layer but the first: a step shared with requests that keep fewer layers
                # dense makes more of this sequence's layers sparse (the step takes the smallest depth).
                seq.working_set = WorkingSet(max(self.cfg.num_layers - 1, 1), sc.budget, self.cfg.num_kv_heads,
                                             self.cfg.head_dim, self.dtype, self.device)
            if seq.host_kv is None and self.offloads(seq.sparse):
                seq.host_kv = HostStore(max(self.cfg.num_layers - 1, 1), self.cfg.num_kv_heads, self.cfg.head_dim,
                                        self.dtype, pin=self.device.type == "cuda")
            if seq.host_kv is not None:
                seq.host_kv.reserve(seq.num_computed_tokens)
        return SparseStep(self, seqs, [s.working_set for s in seqs], rows)


def context_slots(block_table: list[int], lo: int, hi: int, block_size: int, device) -> torch.Tensor:
    """The paged-pool slots of positions [lo, hi), built on `device` from the block table (paged_slots,
    for a whole range without a Python list as long as the context)."""
    table = torch.tensor(block_table, dtype=torch.long).to(device, non_blocking=True)
    pos = torch.arange(lo, hi, device=device)
    return table[pos // block_size] * block_size + pos % block_size


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
            slots = context_slots(c.seq.block_table, 0, end, block_size, device)
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
class Fetch:
    """One sequence's copies into its working set at a step: (slot, paged-pool slot) from the device's
    pool, and (slot, position) from its host store."""

    ws: WorkingSet
    store: HostStore | None = None
    paged: list = field(default_factory=list)
    host: list = field(default_factory=list)

    def indexed(self, device) -> Fetch:
        """The same copies as index tensors: each of `paged` and `host` becomes (slots, sources), or []
        when empty. Positions in the host store index host memory."""
        def pair(items: list, source_device) -> tuple | list:
            if not items:
                return []
            slots, sources = zip(*items, strict=True)
            return (torch.tensor(slots, dtype=torch.long, device=device),
                    torch.tensor(sources, dtype=torch.long, device=source_device))

        return Fetch(self.ws, self.store, pair(self.paged, device), pair(self.host, "cpu"))


@dataclass
class SparseStep:
    """One step's sparse decodes: rows of the flat batch, their selections and in-flight fetches."""

    owner: SparseKV
    seqs: list
    sets: list[WorkingSet]
    rows: slice
    dense_meta: object = None  # the step's metadata without the sparse rows (set by the runner)
    retrieval_layers: int = field(init=False)
    _fetches: dict[int, Future | torch.cuda.Event] = field(default_factory=dict)  # per layer: its copies
    _sizes: list[int] = field(default_factory=list)  # per sequence: its occupied slots, [0, n)
    _held: tuple | None = None  # on a GPU: the index tensors the side stream reads

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
        fetch_plan, spill_plan = [], []
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
                    fixed = ws.observed(seq, lo, hi, min(sc.observed_tokens, k))
                    scores = self._scores(seq, q[b], k_cache, group, d, 0, p)
                    scores[fixed.to(scores.device, non_blocking=True)] = float("-inf")  # the head picks others
                    dynamic = torch.topk(scores[lo:hi], k - fixed.numel()).indices.add_(lo).cpu()
                    middle = set(fixed.tolist()) | set(dynamic.tolist())
                selection = sorted(set(range(lo)) | set(range(hi, p)) | middle)
            slots, positions = ws.update(selection)
            store = seq.host_kv
            held = 0  # positions [0, held) are read from the host store, the rest from the paged pool
            if store is not None:  # spill what the paged pool gained since the last step
                held = store.num_spilled
                spill_plan.append((store, held, paged_slots(seq.block_table, range(held, p), bs)))
                owner.stats.spilled += p - held
                store.num_spilled = p
            fetch = Fetch(ws, store)
            for slot, pos, src in zip(slots, positions, paged_slots(seq.block_table, positions, bs), strict=True):
                if pos < held:
                    fetch.host.append((slot, pos))
                else:
                    fetch.paged.append((slot, src))
            owner.stats.fetched_from_host += len(fetch.host)
            fetch_plan.append(fetch)
            st = owner.stats
            st.steps += 1
            st.selected += len(selection)
            st.fetched += len(positions)
            st.context += p
            n = len(selection)
            assert ws.slot_pos[n] < 0 and (n == 0 or ws.slot_pos[n - 1] >= 0)  # occupied: [0, n)
            self._sizes.append(n)
        self._start_fetches(fetch_plan, spill_plan)

    def _probs(self, seq, q: torch.Tensor, k_cache: torch.Tensor, group: int, d: int, lo: int, hi: int):
        """Attention probabilities [Hq, hi - lo] of the decoded token over cached positions [lo, hi)."""
        slots = context_slots(seq.block_table, lo, hi, self.owner.block_size, k_cache.device)
        keys = k_cache.view(-1, *k_cache.shape[-2:]).index_select(0, slots)
        hkv = keys.shape[1]
        logits = torch.einsum("hgd,phd->hgp", q.view(hkv, group, d).float(), keys.float()) * d**-0.5
        return logits.softmax(-1).flatten(0, 1)

    def _scores(self, seq, q, k_cache, group: int, d: int, lo: int, hi: int) -> torch.Tensor:
        """A position's score is its largest probability over the heads: retrieval is the work of a few
        heads, and a mean over all of them would drown those in the heads that look nearby."""
        return self._probs(seq, q, k_cache, group, d, lo, hi).amax(0)

    def _start_fetches(self, plan: list[Fetch], spill_plan) -> None:
        """spill_plan: (host store, first position, paged slots of the positions to spill)."""
        owner = self.owner
        dev = owner.device

        spills = [(store, start, torch.tensor(paged, dtype=torch.long, device=dev))
                  for store, start, paged in spill_plan if paged]
        fetches = [f.indexed(dev) for f in plan if f.paged or f.host]
        if not spills and not fetches:
            return

        def copy_layer(layer: int) -> None:
            kc, vc = (c.view(-1, *c.shape[-2:]) for c in owner.kv_caches[layer])
            li = layer - 1
            for store, start, paged in spills:
                store.spill(li, kc.index_select(0, paged), vc.index_select(0, paged), start)
            if layer < self.retrieval_layers:
                return
            for f in fetches:
                sources = []
                if f.paged:
                    slots, pool = f.paged
                    sources.append((slots, kc.index_select(0, pool), vc.index_select(0, pool)))
                if f.host:
                    slots, positions = f.host
                    k, v = f.store.gather(li, positions)
                    sources.append((slots, k.to(dev, non_blocking=True), v.to(dev, non_blocking=True)))
                for slots, k, v in sources:
                    f.ws.k[li].index_copy_(1, slots, k.transpose(0, 1))
                    f.ws.v[li].index_copy_(1, slots, v.transpose(0, 1))

        # Layer order: layer l is copied while layer l-1 computes. Spills cover every layer a working set
        # has: a later step may keep fewer layers dense.
        layers = range(1 if spills else self.retrieval_layers, owner.cfg.num_layers)
        stream = owner._stream
        if stream is None:
            def run(layer: int) -> None:
                with torch.inference_mode():  # inference mode is per thread
                    copy_layer(layer)

            for layer in layers:
                self._fetches[layer] = owner._pool.submit(run, layer)
            return
        # The index tensors were made on the compute stream: held until finish(), after the compute
        # stream has waited for the copies, or the allocator could hand their memory out under them.
        self._held = (spills, fetches)
        stream.wait_stream(torch.cuda.current_stream())  # every K/V written so far
        with torch.cuda.stream(stream):
            for layer in layers:
                copy_layer(layer)
                self._fetches[layer] = torch.cuda.Event()
                self._fetches[layer].record(stream)
        if spills:
            owner.last_spill = self._fetches[layers[-1]]

    # -- attention of a sparse layer ----------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q: [B, Hq, D]; k, v: [B, Hkv, D] of the new tokens. Attends over each working set + itself,
        in place: the new token goes into the slot after the occupied ones."""
        self._wait(self._fetches.pop(layer, None))
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

    @staticmethod
    def _wait(fetch) -> None:
        if isinstance(fetch, Future):
            fetch.result()
        elif fetch is not None:
            torch.cuda.current_stream().wait_event(fetch)

    def finish(self) -> None:
        for fetch in self._fetches.values():  # never leave a copy running past its step
            self._wait(fetch)
        self._fetches.clear()
        self._held = None
