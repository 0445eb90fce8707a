"""LoRAManager: adapters in host memory, `max_loras` slots on the device, and each step's rows.

Every LoRA-carrying Linear of the model (q/k/v fused as qkv_proj, o_proj, gate/up fused as
gate_up_proj, down_proj) gets slot-stacked tensors once, at engine start (R = n_slices * max_lora_rank):

    lora_a:  [max_loras, in, R]    the slices' A^T side by side: one shrink matmul for q, k and v
    lora_b:  [max_loras, R, out]   s * B^T, block-diagonal: slice j's rank rows feed only its columns

A fused layer's slices (q, k, v; gate, up) each have their own A and B; a target the adapter does not
train, the rank padding up to max_lora_rank and the off-diagonal blocks are zeros (a prefill segment's
expand is one GEMM over the whole block matrix; the decode group and the Triton kernel read the
diagonal blocks). The slots are in the compute dtype; products accumulate in fp32.

Adapters wait in host memory (fp32, up to `max_cpu_loras`, LRU; one that fell out is read from its
directory again) and are copied into a slot when a running sequence needs them, evicting the least
recently used slot whose adapter no running sequence holds (the scheduler admits at most max_loras
distinct adapters at once, so there always is one).

Before each forward the runner hands the step's rows (`set_step`): the flat batch is ordered so that
the rows of one adapter are contiguous (within the decodes, and within the prefill chunks, base-model
rows first), and the layers read the step's plan (LoRAStep). With tessera's C++ kernels on a CPU every
run of one adapter's rows is a segment and one `lora_sgmv` call per linear adds them all. Without
them, prefill chunks are segments, each one pair of GEMMs on a row range, and the decode rows of
several adapters are one padded group, a batched GEMM pair over [adapters, rows per adapter]
(tessera.lora.layer explains the choice). Rows of the base model are in neither.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from tessera.config import ModelConfig
from tessera.errors import InvalidRequestError, TesseraError
from tessera.lora.adapter import LoRAAdapter, load_adapter
from tessera.lora.request import LoRARequest

log = logging.getLogger(__name__)

# A segment's fixed cost (its few small GEMMs) in rows of LoRA work: a decode run longer than the next
# longest by more than this over the group's members goes alone (tessera.lora.layer).
SEGMENT_ROWS = 32

# tessera layer attribute -> the HF targets of its output slices, in output order.
LAYER_SLICES = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    "mlp.down_proj": ("down_proj",),
}


@dataclass
class PaddedGroup:
    """Decode rows of several adapters as one batched product: `pad_index` [G * L] picks each group
    member's rows (padded to L with its first row), `rows` [N] are the rows themselves, in order, and
    `back_index` [N] finds each in the padded layout; `slots` [G] the members' slots (None: all slots,
    in order)."""

    length: int  # L
    pad_index: torch.Tensor
    rows: torch.Tensor
    back_index: torch.Tensor
    slots: torch.Tensor | None


@dataclass
class LoRAStep:
    """One step's plan: `segments` (start, end, slot) of contiguous rows, `group` (the decode rows of
    several adapters, or None), and on CUDA `token_slots`, each row's slot or -1 (the kernel's input)."""

    segments: list[tuple[int, int, int]]
    group: PaddedGroup | None = None
    token_slots: torch.Tensor | None = None


class LoRAManager:
    kernels = None  # see __init__

    def __init__(self, model, cfg: ModelConfig, max_loras: int, max_lora_rank: int, max_cpu_loras: int | None,
                 device: torch.device, dtype: torch.dtype):
        self.cfg = cfg
        self.max_loras, self.max_rank = max_loras, max_lora_rank
        self.max_cpu_loras = max(max_cpu_loras or max_loras, max_loras)
        self.device, self.dtype = device, dtype
        self.slot_dtype = dtype
        self.layers: list[tuple[int, str, object]] = []  # (layer index, attribute, Linear)
        for i, block in enumerate(model.layers):
            for attr, targets in LAYER_SLICES.items():
                mod, name = attr.split(".")
                lin = getattr(getattr(block, mod), name)
                self._allocate(lin, targets)
                self.layers.append((i, attr, lin))
        self.requests: dict[int, LoRARequest] = {}  # lora_int_id -> the request that registered it
        self.host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # LRU of adapters in host memory
        self.slot_ids: list[int | None] = [None] * max_loras  # lora_int_id held by each slot
        self.slot_used: list[int] = [0] * max_loras  # the step each slot was last activated in (LRU)
        self.tick = 0
        self.swaps = 0  # adapters copied into a slot, for benchmarks and tests
        self.step: LoRAStep | None = None
        # tessera's C++ kernels on a CPU: every run of rows is a segment, all added by one lora_sgmv call
        # per linear (tessera.lora.layer); None: ATen ops, with the padded group for many-adapter decodes.
        self.kernels = None
        if device.type == "cpu":
            from tessera.ops.cpu_kernels import cpu_kernels

            self.kernels = cpu_kernels()

    def _allocate(self, lin, targets: tuple[str, ...]) -> None:
        s, r = self.max_loras, self.max_rank
        kw = dict(device=self.device, dtype=self.slot_dtype)
        lin.lora_a = torch.zeros(s, lin.in_features, len(targets) * r, **kw)
        lin.lora_b = torch.zeros(s, len(targets) * r, lin.out_features, **kw)
        sizes = [_out(self.cfg, t) for t in targets]
        assert sum(sizes) == lin.out_features, (targets, sizes, lin.out_features)
        bounds, at = [], 0
        for n in sizes:
            bounds.append((at, at + n))
            at += n
        lin.lora_slices = bounds

    @property
    def slot_bytes(self) -> int:
        """Device memory of the slots, all layers together."""
        return sum((lin.lora_a.numel() + lin.lora_b.numel()) * lin.lora_a.element_size() for _, _, lin in self.layers)

    # -- adapters ----------------------------------------------------------------------------
    def register(self, req: LoRARequest) -> LoRAAdapter:
        """Check `req` against the adapters known so far and load it into host memory (once); raises
        a TesseraError naming the problem (bad path, unsupported feature, wrong base model, rank)."""
        known = self.requests.get(req.lora_int_id)
        if known is not None and (known.lora_name, known.lora_path) != (req.lora_name, req.lora_path):
            raise InvalidRequestError(f"lora_int_id {req.lora_int_id} is already adapter {known.lora_name!r} "
                                      f"({known.lora_path}); give {req.lora_name!r} its own id")
        adapter = self._host(req)
        self.requests[req.lora_int_id] = req
        return adapter

    def _host(self, req: LoRARequest) -> LoRAAdapter:
        lid = req.lora_int_id
        adapter = self.host.get(lid)
        if adapter is None:
            adapter = load_adapter(req.lora_name, req.lora_path, self.cfg, self.max_rank)
            self.host[lid] = adapter
            while len(self.host) > self.max_cpu_loras:
                self.host.popitem(last=False)
        self.host.move_to_end(lid)
        return adapter

    def remove(self, lora_int_id: int) -> None:
        """Forget an adapter (the server's unload): new requests can no longer name it; a slot it holds
        is freed once no running sequence uses it."""
        self.requests.pop(lora_int_id, None)
        self.host.pop(lora_int_id, None)

    # -- slots -------------------------------------------------------------------------------
    def activate(self, seqs) -> dict[int, TesseraError]:
        """Give every adapter of `seqs` (the running sequences) a slot; adapters of seqs are never evicted.
        Returns the adapters that could not be put in one, {lora_int_id: the error}: one that fell out of
        host memory is read from its directory again, and the files may have gone (or changed) since it
        was registered. The engine fails those adapters' sequences alone; the rest of the step runs."""
        self.tick += 1
        wanted = {s.lora_request.lora_int_id: s.lora_request for s in seqs if s.lora_request is not None}
        if len(wanted) > self.max_loras:  # the scheduler's cap makes this unreachable
            raise RuntimeError(f"{len(wanted)} adapters running at once but max_loras is {self.max_loras}")
        failed: dict[int, TesseraError] = {}
        for lid, req in wanted.items():
            if lid in self.slot_ids:
                self.slot_used[self.slot_ids.index(lid)] = self.tick
                continue
            try:
                adapter = self._host(req)
            except TesseraError as e:
                log.error("LoRA %s: cannot reload it into a slot: %s", req.lora_name, e)
                failed[lid] = e
                continue
            free = [k for k, held in enumerate(self.slot_ids) if held is None or held not in wanted]
            slot = min(free, key=lambda k: (self.slot_ids[k] is not None, self.slot_used[k]))
            self._load_slot(slot, adapter)
            self.slot_ids[slot], self.slot_used[slot] = lid, self.tick
        return failed

    def _load_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        r = self.max_rank
        for i, attr, lin in self.layers:
            lin.lora_a[slot].zero_()
            lin.lora_b[slot].zero_()
            for j, target in enumerate(LAYER_SLICES[attr]):
                pair = adapter.weights.get((i, target))
                if pair is None:
                    continue
                a_w, b_w = pair  # [rank, in], [out, rank]
                k = a_w.shape[0]
                o0, o1 = lin.lora_slices[j]
                lin.lora_a[slot, :, j * r:j * r + k].copy_(a_w.t())
                lin.lora_b[slot, j * r:j * r + k, o0:o1].copy_(b_w.t())
        self.swaps += 1
        log.debug("LoRA %s -> slot %d", adapter.name, slot)

    def slot_of(self, seq) -> int:
        """The slot of seq's adapter (activate() put it there), -1 for the base model."""
        req = seq.lora_request
        return -1 if req is None else self.slot_ids.index(req.lora_int_id)

    # -- the step ----------------------------------------------------------------------------
    def set_step(self, row_counts: list[int], slots: list[int], num_decode: int = 0) -> None:
        """The step's flat batch: each sequence's rows (in batch order) and its slot (-1: base); the
        first num_decode sequences are one-row decodes (ordered by slot)."""
        runs: list[tuple[int, int, int]] = []  # maximal row ranges of one slot
        at = 0
        for n, slot in zip(row_counts, slots, strict=True):
            if slot >= 0:
                if runs and runs[-1][2] == slot and runs[-1][1] == at:
                    runs[-1] = (runs[-1][0], at + n, slot)
                else:
                    runs.append((at, at + n, slot))
            at += n
        if not runs:
            self.step = None
            return
        token_slots = None
        if self.device.type == "cuda":
            idx = torch.full((at,), -1, dtype=torch.int32)
            for a, b, slot in runs:
                idx[a:b] = slot
            token_slots = idx.to(self.device, non_blocking=True)
        if self.kernels is not None:  # one lora_sgmv call takes every run as it is
            self.step = LoRAStep(runs, None, token_slots)
            return
        decode_runs = [r for r in runs if r[1] <= num_decode]
        segments = runs[len(decode_runs):]
        group = None
        # A run much longer than the rest (a skewed spread) costs less as a segment of its own than as
        # the length every group member is padded to.
        decode_runs.sort(key=lambda r: r[0] - r[1])
        while len(decode_runs) > 2:
            longest, nxt = decode_runs[0][1] - decode_runs[0][0], decode_runs[1][1] - decode_runs[1][0]
            if (longest - nxt) * len(decode_runs) <= SEGMENT_ROWS:
                break
            segments.append(decode_runs.pop(0))
        if len(decode_runs) > 2:
            group = self._group(sorted(decode_runs))
        else:
            segments += decode_runs
        self.step = LoRAStep(segments, group, token_slots)

    def _group(self, runs: list[tuple[int, int, int]]) -> PaddedGroup:
        """The decode rows of several adapters, padded to the longest run: one batched GEMM pair for them
        all. Slots with no rows are left out of the batch when that saves work (see PaddedGroup)."""
        length = max(b - a for a, b, _ in runs)
        by_slot = {s: (a, b) for a, b, s in runs}
        # All slots in order (no copy of the weights) unless most of them would be padding only.
        members = list(range(self.max_loras)) if 2 * len(runs) >= self.max_loras else [s for _, _, s in runs]
        pad, rows, back = [], [], []
        first = runs[0][0]
        for s in members:
            a, b = by_slot.get(s, (first, first))
            for k in range(length):
                if a + k < b:
                    rows.append(a + k)
                    back.append(len(pad))
                    pad.append(a + k)
                else:
                    pad.append(first)
        dev = self.device
        return PaddedGroup(length, torch.tensor(pad, device=dev), torch.tensor(rows, device=dev),
                           torch.tensor(back, device=dev),
                           None if len(members) == self.max_loras else torch.tensor(members, device=dev))

    def clear_step(self) -> None:
        self.step = None


def _out(cfg: ModelConfig, target: str) -> int:
    from tessera.lora.adapter import module_shape

    return module_shape(cfg, target)[1]
