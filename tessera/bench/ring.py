"""`tessera bench ring`: ring attention vs TokenRing on local gloo ranks, beside the step-time model.

For each number of ranks the ranks are spawned afresh; on them:
1. a ping-pong between ranks 0 and 1 (message sizes 4 KiB..16 MiB) gives gloo's one-way latency and
   bandwidth here (comm_model.fit_link);
2. one zig-zag block of attention, timed alone, gives this CPU's effective attention FLOP/s (the
   model's FLOP count over the kernel's time: tessera's torch block kernel computes the whole masked
   block, so this rate is what the model's "peak" means here), and a large copy the memory bandwidth;
3. the two schedules run alternately `repeats` times over the same Q/K/V (causal, zig-zag); a step's
   time is the schedule's wall time (the slowest rank's) over its N steps, and each rank's sent bytes
   are counted by the schedule's P2P wrapper.
The model's prediction for the same shape, device and fitted link comes next to the measurement, and
its prediction at the TokenRing paper's setting next to the paper's figures.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from tessera.distributed import comm_model as cm

PING_SIZES = [4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]

# The TokenRing paper's setting (ACA-Lab-SJTU/token-ring README, the measurement behind arXiv:2412.20501's
# 3.5 vs 7.6 ms): 4 A10 GPUs on PCIe (PIX/PXB), LLaMA2-7B attention (32 heads, MHA, head_dim 128),
# sequence length 24,000, causal zig-zag; fp16 assumed.
PAPER_SHAPE = cm.AttentionShape(24000, 32, 32, 128, 2)
PAPER_WORLD = 4
PAPER_MS = {"ring": 7.6, "tokenring": 3.5}


def add_ring_args(sub) -> None:
    p = sub.add_parser("ring", help="ring attention vs TokenRing on local gloo ranks, beside the step-time model")
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="numbers of ranks to run")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8, help="default: MHA, as the paper")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=540.0, help="seconds per number of ranks")
    p.add_argument("--json-out", default=None)


def bench_ring(args) -> dict:
    from tessera.bench.compare import cpu_flags
    from tessera.distributed.launch import spawn_ranks

    shape = cm.AttentionShape(args.seq_len, args.heads, args.kv_heads, args.head_dim, 4)  # fp32 on the CPU
    runs = []
    for world in args.worlds:
        ranks = spawn_ranks(_rank, world, (shape, args.repeats), timeout_s=args.timeout)
        runs.append(_summarize(shape, world, ranks))
    paper = {}
    for name, (dev, link) in {"spec PCIe 4.0 x16": (cm.A10, cm.PCIE4),
                              "PCIe at the bandwidth the paper's ring step implies": (cm.A10, _paper_link())}.items():
        pred = cm.predict(PAPER_SHAPE, PAPER_WORLD, dev, link)
        paper[name] = {"link_GB_s": round(link.bandwidth / 1e9, 2), "compute_ms": round(pred["compute_s"] * 1e3, 2),
                       "ring_ms": round(pred["ring_step_s"] * 1e3, 2),
                       "tokenring_ms": round(pred["tokenring_step_s"] * 1e3, 2)}
    setting = {k: getattr(args, k) for k in ("worlds", "seq_len", "heads", "kv_heads", "head_dim", "repeats")}
    return {"bench": "ring", "setting": setting | {"dtype": "float32"}, "runs": runs,
            "paper_setting": {"shape": PAPER_SHAPE.__dict__, "world": PAPER_WORLD, "device": "A10",
                              "reported_ms": PAPER_MS, "predicted": paper},
            "model_table_N2to8": [{k: (round(v * 1e3, 3) if k.endswith("_s") else v) for k, v in row.items()}
                                  for row in cm.table(PAPER_SHAPE)],
            "cpu": cpu_flags()}


def _paper_link() -> cm.Link:
    """The PCIe bandwidth at which the model's ring step equals the paper's 7.6 ms (the same latency)."""
    nbytes = cm.ring_step_bytes(PAPER_SHAPE, PAPER_WORLD)
    return cm.Link("PCIe (paper's ring)", nbytes / (PAPER_MS["ring"] * 1e-3 - cm.PCIE4.latency), cm.PCIE4.latency)


def _summarize(shape, world: int, ranks: list[dict]) -> dict:
    device = cm.Device("this CPU, one thread a rank (tessera's block kernel)", ranks[0]["block_flops"],
                       ranks[0]["mem_bandwidth"])
    fit = ranks[0]["pingpong"]
    link = cm.fit_link(fit["sizes"], fit["one_way_s"], "gloo (loopback, fitted)")
    pred = cm.predict(shape, world, device, link)
    out = {"world": world, "gloo_latency_us": round(link.latency * 1e6, 1),
           "gloo_bandwidth_GB_s": round(link.bandwidth / 1e9, 3),
           "block_GFLOP_s": round(device.peak_flops / 1e9, 2), "mem_GB_s": round(device.mem_bandwidth / 1e9, 1)}
    for mode in ("ring", "tokenring"):
        # per repeat the slowest rank's time, then the median over repeats
        per_repeat = [max(r[mode]["times"][k] for r in ranks) for k in range(len(ranks[0][mode]["times"]))]
        out[mode] = {"measured_step_ms": round(statistics.median(per_repeat) / world * 1e3, 3),
                     "bytes_sent_per_rank": [r[mode]["bytes"] for r in ranks],
                     "predicted_step_ms": round(pred[f"{mode}_step_s"] * 1e3, 3)}
    ms = {mode: out[mode]["measured_step_ms"] for mode in ("ring", "tokenring")}
    out["measured_tokenring_over_ring"] = round(ms["tokenring"] / ms["ring"], 3)
    out["predicted_tokenring_over_ring"] = round(pred["tokenring_step_s"] / pred["ring_step_s"], 3)
    out["predicted_compute_ms"] = round(pred["compute_s"] * 1e3, 3)
    return out


def _rank(ctx, shape, repeats: int) -> dict:
    from tessera.distributed.ring_attention import P2P, block_attention, ring_attention, tokenring_attention
    from tessera.distributed.zigzag import zigzag_positions

    rank, world = ctx.rank, ctx.world_size
    out = {"pingpong": _pingpong(rank) if rank < 2 else None}
    g = torch.Generator().manual_seed(0)
    n = shape.seq_len
    q = torch.randn(n, shape.num_heads, shape.head_dim, generator=g)
    k = torch.randn(n, shape.num_kv_heads, shape.head_dim, generator=g)
    v = torch.randn(n, shape.num_kv_heads, shape.head_dim, generator=g)
    positions = zigzag_positions(n, world)
    mine = positions[rank]
    q, k, v = q[mine].contiguous(), k[mine].contiguous(), v[mine].contiguous()
    scale = shape.head_dim**-0.5
    # this CPU's effective rate on one off-diagonal zig-zag block, in the model's FLOPs
    other = positions[(rank + 1) % world]
    t = n / world
    out["block_flops"] = 4 * (t * t / 2) * shape.num_heads * shape.head_dim / _median_time(
        lambda: block_attention(q, k, v, mine, other, scale))
    src, dst = torch.ones(64 << 20, dtype=torch.uint8), torch.zeros(64 << 20, dtype=torch.uint8)
    out["mem_bandwidth"] = 2 * src.numel() / _median_time(lambda: dst.copy_(src))
    schedules = {"ring": ring_attention, "tokenring": tokenring_attention}
    for mode in schedules:
        out[mode] = {"times": [], "bytes": 0}
    for _ in range(repeats):
        for mode, schedule in schedules.items():  # alternating
            comm = P2P(rank, world)
            dist.barrier()
            t0 = time.perf_counter()
            schedule(q, k, v, positions, comm, scale)
            out[mode]["times"].append(time.perf_counter() - t0)
            out[mode]["bytes"] = comm.bytes_sent
    dist.barrier()
    return out


def _median_time(fn, rounds: int = 3) -> float:
    fn()  # warm-up (first touch of the pages, allocator)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pingpong(rank: int, rounds: int = 5) -> dict:
    """Ranks 0 and 1 bounce messages; one-way time = median round trip / 2."""
    peer = 1 - rank
    one_way = []
    for size in PING_SIZES:
        buf = torch.zeros(size, dtype=torch.uint8)
        times = []
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, peer)
                dist.recv(buf, peer)
            else:
                dist.recv(buf, peer)
                dist.send(buf, peer)
            times.append(time.perf_counter() - t0)
        one_way.append(statistics.median(times[1:]) / 2)
    return {"sizes": PING_SIZES, "one_way_s": one_way}
