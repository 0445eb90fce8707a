"""`tessera bench fleet`: replay a slice of the Azure 2023 trace (tessera/fleet/trace.py, the one the
simulator replays) in real time against a real fleet, N engine instances behind the router, for each
fleet size and routing policy; p50/p99 TTFT, TBT and e2e, idle fraction and peak KV per instance.

Each (size, policy) run starts its instances afresh (cold prefix caches), replays the trace's arrivals,
streams every request through the router and records it in the fleet result shape shared with the
simulator (tessera/fleet/metrics.py): `--out-dir` gets one FleetResult JSON per run, which
`tessera sim ... --compare FILES` reads. Run it under the exclusive machine lock.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from pathlib import Path

from tessera.config import EngineConfig, add_engine_args
from tessera.config_args import add_config_args, config_kwargs
from tessera.fleet.config import ROUTING, FleetConfig
from tessera.fleet.trace import TraceSpec, load_trace, prompt_token_ids
from tessera.sampling_params import SamplingParams


def add_fleet_bench_args(sub) -> None:
    p = sub.add_parser("fleet", help="a real fleet (Ray actors) on an Azure 2023 trace slice, per routing policy")
    p.add_argument("--instances", type=int, nargs="+", default=[2, 4], help="fleet sizes (default: 2 4)")
    p.add_argument("--routing", nargs="+", default=ROUTING, choices=ROUTING, help="policies (default: all)")
    p.add_argument("--backend", choices=["ray", "local"], default="ray")
    p.add_argument("--instance-threads", type=int, default=1)
    p.add_argument("--out-dir", default=None, help="write fleet-<policy>-<n>.json (FleetResult, per request) here")
    p.add_argument("--json-out", default=None)
    add_config_args(p.add_argument_group("trace"), TraceSpec)
    add_engine_args(p)


async def _replay(engine_config: EngineConfig, fleet: FleetConfig, trace, prompts, spec: TraceSpec):
    from tessera.fleet.launch import start_router, stop_instances

    router = await start_router(engine_config, fleet, max_waiting=1 << 20, keep_records=True)
    try:
        queue: asyncio.Queue = asyncio.Queue()
        router.start()
        await asyncio.sleep(0.2)  # first snapshots in
        t0 = time.monotonic()
        for tr, ids in zip(trace, prompts, strict=True):
            delay = tr.arrival - (time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            params = SamplingParams(max_tokens=tr.output_tokens, temperature=0.0, ignore_eos=True)
            await router.add(tr.request_id, None, ids, params, queue, stream=True)
        left = len(trace)  # every final output comes through the queue
        while left > 0:
            _, out = await asyncio.wait_for(queue.get(), 600)
            left -= out.finished
        records = await router.instance_records(router.kv_bytes_per_block)
        engine = {k: v for k, v in dataclasses.asdict(engine_config).items() if v is not None}
        moves = {k: sum(getattr(s, k) for s in router.snaps)
                 for k in ("adopted_with_kv", "adopted_recomputed", "copies_dropped", "layer_streamed_chunks")}
        config = {"trace": dataclasses.asdict(spec), "engine": engine, "moves": moves,
                  "backend": fleet.backend, "instance_threads": fleet.instance_threads}
        result = router.result(records, config)
        span = max(r.finish for r in result.requests) - min(r.arrival for r in result.requests)
        for rec in result.instances:  # busy over the same span the requests took
            rec.span = span
        return result
    finally:
        router.stop()
        stop_instances(router.handles)


def bench_fleet(args: argparse.Namespace) -> dict:
    spec = TraceSpec(**config_kwargs(args, TraceSpec))
    engine_config = EngineConfig.from_cli_args(args)
    from tessera.config import ModelConfig
    from tessera.models.loader import resolve_model_path

    vocab = ModelConfig.from_dir(resolve_model_path(engine_config.model)).vocab_size  # converts a GGUF once, here
    spec = dataclasses.replace(spec, vocab_size=min(spec.vocab_size, vocab))
    trace = load_trace(spec)
    prompts = [prompt_token_ids(t, spec) for t in trace]
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    from tessera.cpu_features import describe

    if args.backend == "ray":
        from tessera.fleet.launch import init_ray

        init_ray(FleetConfig(max(args.instances), "ray", instance_threads=args.instance_threads))
    runs = []
    for n in args.instances:
        for policy in args.routing:
            fleet = FleetConfig(n, args.backend, policy, None, args.instance_threads)
            try:
                fleet.validate()
            except Exception as e:  # e.g. accellm with an odd count
                runs.append({"policy": policy, "num_instances": n, "skipped": str(e)})
                continue
            result = asyncio.run(_replay(engine_config, fleet, trace, prompts, spec))
            if out_dir:
                (out_dir / f"fleet-{policy}-{n}.json").write_text(result.dumps(per_request=True))
            summary = result.summary()
            pct = {m: "/".join(f"{summary[m][q]:.0f}" for q in ("p50_ms", "p99_ms")) for m in ("ttft", "tbt", "e2e")}
            print(f"{policy:>12} x{n}: p50/p99 ms: ttft {pct['ttft']}, tbt {pct['tbt']}, e2e {pct['e2e']}; "
                  f"idle {summary['idle_fraction_mean']:.2f}; completed {summary['completed']}; moves "
                  f"{result.config['moves']}", flush=True)
            runs.append({**summary, "moves": result.config["moves"]})
    return {"bench": "fleet", "trace": dataclasses.asdict(spec), "num_requests": len(trace),
            "cpu": describe(), "runs": runs}
