"""A step-time model of sequence-parallel attention: ring attention vs TokenRing.

One step of either schedule computes one block of attention per rank while the next step's data moves;
with the transfer overlapped, a step takes max(compute, communication).

- compute: a roofline: max(FLOPs / peak FLOP/s, bytes / memory bandwidth) for the block. Under the
  zig-zag split (zigzag.py) every step of every rank sees about half of its T x T block (T = L / N
  tokens per rank), so FLOPs = 4 * (T^2 / 2) * Hq * D (QK^T and PV, 2 FLOPs a multiply-add).
- communication: latency + bytes / bandwidth per transfer.
  ring: each rank sends the K/V it holds, 2 * T * Hkv * D * elt bytes, to rank r+1: one direction of
  one link per step.
  TokenRing: each rank sends its held queries, T * Hq * D * elt, forward, and a block result,
  T * Hq * (D * elt + 4), back to the queries' owner. On full-duplex links the two go at once, in
  opposite directions (adjacent ranks) or over different links (a full mesh: NVSwitch, HCCS), so the
  step waits for the larger; on a link that carries one direction at a time they add up.

With multi-head attention (Hkv = Hq) ring moves 2 T Hq D elt bytes one way per step and TokenRing about
half of that each way, so where communication bounds the step TokenRing is up to ~2x faster; with GQA
(Hkv << Hq) ring's K/V are small and ring wins. `crossover` finds where.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # FLOP/s at the attention's dtype (dense)
    mem_bandwidth: float  # bytes/s


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s, one direction, between two ranks
    latency: float  # seconds per transfer
    full_duplex: bool = True  # both directions at full bandwidth at once


@dataclass(frozen=True)
class AttentionShape:
    seq_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    elt: int = 2  # bytes per element (bf16/fp16)


# Published figures (datasheets; per direction unless said).
# NVIDIA A10 datasheet: 125 TFLOPS FP16 tensor (dense; 250 with sparsity), 600 GB/s GDDR6, PCIe Gen4 x16.
A10 = Device("A10", 125e12, 600e9)
# NVIDIA H100 SXM5 datasheet: 989 TFLOPS BF16 dense (1,979 with sparsity), 3.35 TB/s HBM3.
H100 = Device("H100-SXM", 989e12, 3.35e12)
# Huawei Ascend 910 (Hot Chips 31, 2019; Huawei's product page): 256 TFLOPS FP16, HBM2 1.2 TB/s.
ASCEND_910 = Device("Ascend-910", 256e12, 1.2e12)

# PCIe 4.0 x16 (PCI-SIG PCIe 4.0 base specification): 16 GT/s x 16 lanes, 128b/130b coding = 31.5 GB/s
# each way; ~10 us for a GPU peer-to-peer transfer to start (NCCL P2P over PCIe, typical).
PCIE4 = Link("PCIe4-x16", 31.5e9, 10e-6)
# NVLink 4 through NVSwitch (H100 SXM5 datasheet): 900 GB/s per GPU, both directions together -> 450 GB/s
# each way, any pair; ~3 us latency.
NVLINK4 = Link("NVLink4", 450e9, 3e-6)
# HCCS on the Ascend 910 (Huawei's Ascend 910 specification: HCCS 240 Gbit/s): 30 GB/s; the 8 NPUs of a
# server are fully connected by HCCS links; ~5 us assumed.
HCCS = Link("HCCS-910", 30e9, 5e-6)

PUBLISHED = {"pcie4": (A10, PCIE4), "nvlink4": (H100, NVLINK4), "hccs": (ASCEND_910, HCCS)}


def tokens_per_rank(shape: AttentionShape, world: int) -> float:
    return shape.seq_len / world


def block_compute_time(shape: AttentionShape, world: int, device: Device) -> float:
    t = tokens_per_rank(shape, world)
    flops = 4 * (t * t / 2) * shape.num_heads * shape.head_dim
    # q, k, v read and out written once per block
    moved = t * shape.head_dim * shape.elt * (2 * shape.num_heads + 2 * shape.num_kv_heads)
    return max(flops / device.peak_flops, moved / device.mem_bandwidth)


def ring_step_bytes(shape: AttentionShape, world: int) -> float:
    return 2 * tokens_per_rank(shape, world) * shape.num_kv_heads * shape.head_dim * shape.elt


def tokenring_step_bytes(shape: AttentionShape, world: int) -> tuple[float, float]:
    """(queries forward, block result back) per step."""
    t = tokens_per_rank(shape, world)
    return t * shape.num_heads * shape.head_dim * shape.elt, t * shape.num_heads * (shape.head_dim * shape.elt + 4)


def _transfer(nbytes: float, link: Link) -> float:
    return link.latency + nbytes / link.bandwidth


def ring_step_time(shape: AttentionShape, world: int, device: Device, link: Link) -> float:
    return max(block_compute_time(shape, world, device), _transfer(ring_step_bytes(shape, world), link))


def tokenring_step_time(shape: AttentionShape, world: int, device: Device, link: Link) -> float:
    fwd, back = tokenring_step_bytes(shape, world)
    comm = max(_transfer(fwd, link), _transfer(back, link)) if link.full_duplex else \
        _transfer(fwd, link) + _transfer(back, link)
    return max(block_compute_time(shape, world, device), comm)


def predict(shape: AttentionShape, world: int, device: Device, link: Link) -> dict:
    """Per-step times (seconds) and bytes each rank sends per step, for both schedules."""
    fwd, back = tokenring_step_bytes(shape, world)
    return {"world": world, "device": device.name, "link": link.name,
            "compute_s": block_compute_time(shape, world, device),
            "ring_step_s": ring_step_time(shape, world, device, link),
            "tokenring_step_s": tokenring_step_time(shape, world, device, link),
            "ring_step_bytes": ring_step_bytes(shape, world), "tokenring_step_bytes": fwd + back}


def table(shape: AttentionShape, worlds=range(2, 9), links: dict | None = None) -> list[dict]:
    """The prediction for N = 2..8 on each published (device, link) pair."""
    return [predict(shape, n, dev, link) for dev, link in (links or PUBLISHED).values() for n in worlds]


def fit_link(sizes: list[int], seconds: list[float], name: str = "gloo") -> Link:
    """A link from a measured one-way transfer time per message size: least squares t = latency +
    bytes / bandwidth (half of a ping-pong's round trip)."""
    from scipy.stats import linregress

    fit = linregress(sizes, seconds)
    return Link(name, 1.0 / fit.slope if fit.slope > 0 else float("inf"), max(fit.intercept, 0.0))
