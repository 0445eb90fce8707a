"""`tessera bench moe-placement`: cross-rank token moves per MoE layer, round-robin placement with the usual
two all-to-alls against ExFlow's placement with tokens staying on their primary expert's rank.

The placement is fitted on the routing trace of the training essays and measured on the held-out essays
(the split is fixed by the training seed). Moves are counted from the trace for every rank count, and for
the ranks in --real-ranks also from the bytes the real gloo all-to-alls send (tessera.moe.expert_parallel)
over the first --real-windows held-out windows, which must equal the trace's count on those windows."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tessera.errors import ModelLoadError


def add_moe_placement_args(sub) -> None:
    p = sub.add_parser("moe-placement", help="ExFlow vs round-robin expert placement: cross-rank token moves")
    p.add_argument("--model", default=None, help="a `tessera moe-train` checkpoint (default: the default one)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--real-ranks", type=int, nargs="*", default=[2, 4],
                   help="rank counts also run for real on gloo (bytes counted in the all-to-alls)")
    p.add_argument("--real-windows", type=int, default=64, help="held-out windows the real runs process")
    p.add_argument("--method", choices=["auto", "ilp", "greedy"], default="auto")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds for HiGHS")
    p.add_argument("--resolve", action="store_true",
                   help="solve the placements again (default: reuse <model>/placement-R<N>.json when present)")
    p.add_argument("--timeout", type=float, default=480.0, help="deadline of each real run")
    p.add_argument("--json-out", default=None)


def _moves(trace, placement, scheme) -> dict:
    from tessera.moe.traffic import count_moves

    m = count_moves(trace, placement, scheme)
    return {"per_token_layer": round(m.per_token_layer(), 4),
            "per_layer": (m.per_layer / trace.num_tokens).round(4).tolist()}


def _traffic(held, train, rr, ex, co, hidden: int, kv_width: int) -> dict:
    """Everything that crosses ranks per token per MoE layer on the held-out trace, in hidden-state
    widths (values / H): token rows plus exflow's K/V (all-gather, and only to the ranks that need it),
    per placement and scheme; `co` is the placement solved for the two-a2a scheme (co-located experts)."""
    from tessera.moe.traffic import AffinityHome, traffic

    def row(placement, scheme, home=None, kv_mode="all-gather") -> dict:
        t = traffic(held, placement, scheme, hidden, kv_width, home, kv_mode)
        return {k: round(v / hidden, 4) for k, v in t.items() if k != "rows"}

    out = {"round-robin two-a2a": row(rr, "two-a2a"),
           f"{ex.method} two-a2a": row(ex, "two-a2a"),
           "co-located (intra-layer greedy) two-a2a": row(co, "two-a2a"),
           f"{ex.method} exflow, K/V all-gather": row(ex, "exflow"),
           f"{ex.method} exflow, K/V to the ranks that need it": row(ex, "exflow", kv_mode="needed"),
           f"{ex.method} exflow, affinity home, K/V needed": row(ex, "exflow", AffinityHome(train, ex), "needed"),
           "replicated tokens (engine), all-reduce": row(ex, "replicated")}
    out["kv_width_over_hidden"] = round(kv_width / hidden, 4)
    return out


def _real(model_dir, trace, windows, world, placements, timeout) -> dict:
    """Run the held-out windows on `world` gloo ranks; rows/bytes counted in the all-to-alls."""
    from tessera.moe.expert_parallel import run_rank
    from tessera.moe.launch import run_ranks
    from tessera.moe.trace import RoutingTrace
    from tessera.moe.traffic import count_moves

    sub = RoutingTrace(trace.experts[:, :trace.seq_offsets[len(windows)]], trace.seq_offsets[:len(windows) + 1],
                       trace.num_experts)
    jobs = [(str(model_dir), p, scheme, opts) for p, scheme, opts in placements]
    t0 = time.perf_counter()
    results = run_ranks(run_rank, world, (jobs, windows, 4 * world, False), timeout=timeout)[0]
    out = {"windows": len(windows), "tokens": sub.num_tokens, "seconds": round(time.perf_counter() - t0, 1)}
    for (p, scheme, opts), res in zip(placements, results, strict=True):
        s = res["stats"]
        rows = np.array(s.dispatch_rows) + np.array(s.combine_rows)
        sim = count_moves(sub, p, scheme, opts.get("home"))
        label = f"{p.method} {scheme}" + (", affinity home, K/V needed" if opts else "")
        out[label] = {
            "rows_per_token_layer": round(float(rows.sum()) / (sub.num_tokens * sub.num_layers), 4),
            "all_to_all_bytes": int(sum(s.dispatch_bytes) + sum(s.combine_bytes)),
            "all_to_alls_per_layer": s.all_to_alls[0],
            "allgather_bytes": int(sum(s.allgather_bytes)), "count_bytes": s.meta_bytes,
            "equals_trace_count": bool(rows.tolist() == sim.per_layer.tolist())}
    base = out["round-robin two-a2a"]["rows_per_token_layer"]
    ex = next(v for k, v in out.items() if k.endswith(" exflow") and not k.startswith("round-robin"))
    out["reduction_vs_round_robin"] = round(1 - ex["rows_per_token_layer"] / base, 4)
    return out


def bench_moe_placement(args: argparse.Namespace) -> dict:
    from tessera.cpu_features import describe
    from tessera.moe.cli import TRACE_FILES
    from tessera.moe.placement import PairWeights, Placement, round_robin, solve, solve_greedy
    from tessera.moe.trace import RoutingTrace, affinity
    from tessera.moe.traffic import AffinityHome
    from tessera.moe.train import MoeTrainConfig, chunks, default_checkpoint_dir, load_split, read_meta

    model_dir = Path(args.model) if args.model else default_checkpoint_dir(MoeTrainConfig())
    try:
        train, held = (RoutingTrace.load(model_dir / TRACE_FILES[k]) for k in ("train", "held-out"))
    except ModelLoadError as e:
        raise ModelLoadError(f"{e} (train the model and write its traces with `tessera moe-train`)") from e
    meta = read_meta(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // cfg["num_attention_heads"])
    kv_width = 2 * int(cfg["num_key_value_heads"]) * head_dim  # keys and values of one token, one layer
    result = {"model": str(model_dir), "train_config": meta["train_config"], "cpu": describe(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "fit": {"essays": len(meta["train_essays"]), "tokens": train.num_tokens, **affinity(train)},
              "held_out": {"essays": meta["held_out_essays"], "tokens": held.num_tokens, **affinity(held)},
              "ranks": {}}
    windows = None
    for R in args.ranks:
        saved = model_dir / f"placement-R{R}.json"  # `tessera moe-place --trace <train trace> --output` this
        t0 = time.perf_counter()
        if saved.is_file() and not args.resolve:
            ex = Placement.load(saved)
        else:
            ex = solve(train, R, method=args.method, time_limit=args.time_limit)
            ex.info["seconds"] = round(time.perf_counter() - t0, 1)
            ex.save(saved)
        rr = round_robin(train.num_layers, train.num_experts, R)
        co = solve_greedy(PairWeights.from_trace(train).intra_only(), R, time_limit=args.time_limit)
        row = {"placement": {"file": str(saved), "method": ex.method, **ex.info}}
        for name, trace in (("held_out", held), ("fit", train)):
            moves = {"round-robin two-a2a": _moves(trace, rr, "two-a2a"),
                     "round-robin exflow": _moves(trace, rr, "exflow"),
                     f"{ex.method} two-a2a": _moves(trace, ex, "two-a2a"),
                     f"{ex.method} exflow": _moves(trace, ex, "exflow")}
            base = moves["round-robin two-a2a"]["per_token_layer"]
            moves["reduction_vs_round_robin"] = round(1 - moves[f"{ex.method} exflow"]["per_token_layer"] / base, 4)
            row[name] = moves
        row["traffic_per_token_layer"] = _traffic(held, train, rr, ex, co, hidden, kv_width)
        if R in (args.real_ranks or []):
            if windows is None:
                windows = chunks(load_split(model_dir).held_out, int(held.seq_offsets[1]))[:args.real_windows].tolist()
            row["real_gloo"] = _real(model_dir, held, windows, R,
                                     [(rr, "two-a2a", {}), (ex, "exflow", {}), (rr, "exflow", {}),
                                      (ex, "exflow", {"home": AffinityHome(train, ex), "kv_mode": "needed"})],
                                     args.timeout)
        result["ranks"][str(R)] = row
    return result
