"""The `tessera sim` command: replay a trace on a simulated fleet for each routing policy and fleet size
(`tessera sim ...`), or fit the step cost from this machine's engine (`tessera sim fit ...`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from tessera.config_args import add_config_args, config_kwargs
from tessera.errors import InvalidRequestError
from tessera.fleet.contention import FORMS
from tessera.fleet.cost_model import PRESETS, CostModel, load_cost_model
from tessera.fleet.metrics import compare, comparison_table, median_figures
from tessera.fleet.policies import POLICIES
from tessera.fleet.sim import SimConfig, simulate
from tessera.fleet.trace import TraceSpec, load_trace, prompt_token_ids


def add_sim_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--routing", nargs="+", default=list(POLICIES), choices=list(POLICIES),
                   help="policies to simulate (default: all)")
    p.add_argument("--instances", type=int, nargs="+", default=[2, 4], help="fleet sizes (default: 2 4)")
    p.add_argument("--cost", default=None, help="a cost model JSON (from `tessera sim fit --output`)")
    p.add_argument("--cost-preset", choices=list(PRESETS), default=None,
                   help="a published-roofline cost model instead of --cost")
    p.add_argument("--tp", type=int, default=8, help="chips per instance of the preset (tensor parallel)")
    p.add_argument("--link-bandwidth", type=float, default=None, help="override the cost model's link, bytes/s")
    p.add_argument("--compare", nargs="*", default=[],
                   help="FleetResult JSON files of real runs: each simulated (policy, size) is compared with them "
                   "(with several runs of one (policy, size), with each figure's median over them)")
    p.add_argument("--match-speed", action="store_true",
                   help="with --compare: run each simulation at the compared run's own machine speed over the fitted "
                   "runs' (decode steps no other instance overlapped, tessera.fleet.contention.machine_speed): a VM's "
                   "speed drifts between runs, and this tells that drift apart from the simulator's error")
    p.add_argument("--per-request", action="store_true", help="include every request's record in the JSON")
    p.add_argument("--repeats", type=int, default=1,
                   help="simulate each run with this many seeds (the step-noise draws differ) and predict each "
                   "p50/p99 figure by their median")
    p.add_argument("--json-out", default=None)
    add_config_args(p.add_argument_group("trace"), TraceSpec)
    add_config_args(p.add_argument_group("simulated instances"), SimConfig)
    sub = p.add_subparsers(dest="sim_command")
    f = sub.add_parser("fit", help="time real engine steps on this machine and fit the step cost "
                       "(run under the exclusive machine lock)")
    f.add_argument("--output", default=None, help="write the cost model JSON here")
    f.add_argument("--from-runs", nargs="+", default=None, metavar="FILE",
                   help="fit from the steps real fleet runs timed (`tessera bench fleet --out-dir` files) "
                   "instead of timing a grid here")
    f.add_argument("--solo-cost", default=None, metavar="FILE",
                   help="with --from-runs: keep this cost (a grid fit of one engine alone) for each step's shape "
                   "and fit only how the runs' instances slowed each other (contention per policy, the time "
                   "outside steps, the spread left): tessera/fleet/contention.py")
    f.add_argument("--contention-form", choices=FORMS, default="time",
                   help="with --solo-cost: fit each step's time as solo * sum_k share_k * s_k (time, the default) "
                   "or its work as measured * sum_k share_k / s_k (rate: processor sharing's own form; "
                   "tessera/fleet/contention.py says why it is not the default)")
    f.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    f.add_argument("--prompts", type=int, nargs="+", default=[16, 128, 512])
    f.add_argument("--output-tokens", type=int, default=12)
    f.add_argument("--link-bandwidth", dest="fit_link_bandwidth", type=float, default=10e9,
                   help="bytes/s between instances (default 10 GB/s: memory copies between processes)")
    f.add_argument("--link-latency", type=float, default=200e-6)
    f.add_argument("--show-steps", action="store_true", help="list every timed step")
    f.add_argument("--json-out", dest="fit_json_out", default=None)
    from tessera.config import add_engine_args

    add_engine_args(f)
    r = sub.add_parser("replay", help="replay the trace (the flags before `replay`) in real time on one real engine "
                       "in this process: the measured side of a 1-instance prediction (exclusive machine lock)")
    r.add_argument("--json-out", dest="replay_json_out", default=None)
    r.add_argument("--per-request", dest="replay_per_request", action="store_true")
    add_engine_args(r)


def _cost(args: argparse.Namespace) -> CostModel:
    if (args.cost is None) == (args.cost_preset is None):
        raise InvalidRequestError("tessera sim: give --cost FILE (from `tessera sim fit`) or --cost-preset NAME, "
                                  "one of them")
    cost = load_cost_model(args.cost) if args.cost else PRESETS[args.cost_preset](tp=args.tp)
    if args.link_bandwidth:
        cost.link_bandwidth = args.link_bandwidth
    return cost


def _real_runs(paths: list[str]) -> dict[tuple[str, int], list[dict]]:
    """Every real run's record (a summary with or without its instance records), by (policy, size): the
    same command run several times gives several."""
    out: dict[tuple[str, int], list[dict]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        items = data if isinstance(data, list) else data.get("runs", [data])  # (bench fleet --json-out: "runs")
        for item in items:
            s = item.get("summary", item)
            out.setdefault((s["policy"], s["num_instances"]), []).append(item)
    return out


def _measured(runs: list[dict]) -> dict:
    """What a prediction is compared with: the run's figures, or with repeated runs of the same command
    each figure's median over them (on a VM one run's p99 can move by more than the tolerance between two
    runs of the same command)."""
    summaries = [r.get("summary", r) for r in runs]
    return summaries[0] if len(summaries) == 1 else median_figures(summaries)


def _at_speed(cost: CostModel, runs: list[dict], policy: str, n: int) -> CostModel:
    """`cost` at the real runs' machine speed (the median over them) over its fitted runs' (--match-speed)."""
    from tessera.fleet.contention import machine_speed, step_rows

    fitted = cost.speed_for(policy, n)
    speeds = []
    for run in runs:
        rows = step_rows(run, f"the {policy} x{n} run")
        if fitted is None or not rows:
            raise InvalidRequestError(f"--match-speed: {policy} x{n} needs a cost fitted from fleet runs (`tessera sim "
                                      "fit --from-runs`) and compared runs with their step samples (`tessera bench "
                                      "fleet --out-dir` files)")
        measured = machine_speed(rows, cost)  # this run's speed; the runs of one command drift apart
        if measured is None:
            raise InvalidRequestError(f"--match-speed: the {policy} x{n} run has too few decode steps taken alone to "
                                      "measure its machine speed")
        speeds.append(measured)
    return replace(cost, speed=float(np.median(speeds)) / fitted)


def run_sim(args: argparse.Namespace) -> int:
    if args.sim_command == "fit":
        from tessera.fleet.fit import fit_engine

        args.link_bandwidth = args.fit_link_bandwidth
        result = fit_engine(args)
        out_path = args.fit_json_out
    elif args.sim_command == "replay":
        result = replay(args)
        out_path = args.replay_json_out
    else:
        result = simulate_all(args)
        out_path = args.json_out
    text = json.dumps(result, indent=2)
    print(text)
    if out_path:
        Path(out_path).write_text(text + "\n")
    return 0


def replay(args: argparse.Namespace) -> dict:
    from tessera.config import EngineConfig, engine_kwargs
    from tessera.cpu_features import describe
    from tessera.engine.llm_engine import LLMEngine
    from tessera.fleet.replay import replay_engine

    spec = TraceSpec(**config_kwargs(args, TraceSpec))
    trace = load_trace(spec)
    engine = LLMEngine(EngineConfig(**engine_kwargs(args)), progress=False)
    result = replay_engine(engine, trace, [prompt_token_ids(r, spec) for r in trace])
    result.config = {"trace": spec.__dict__, "engine": {k: v for k, v in engine_kwargs(args).items()},
                     "dtype": str(engine.dtype).removeprefix("torch."), "machine": describe(),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    return result.to_json(per_request=args.replay_per_request)


def simulate_all(args: argparse.Namespace) -> dict:
    cost = _cost(args)
    spec = TraceSpec(**config_kwargs(args, TraceSpec))
    trace = load_trace(spec)
    prompts = [prompt_token_ids(r, spec) for r in trace]
    base = SimConfig(**config_kwargs(args, SimConfig))
    real = _real_runs(args.compare)
    if args.match_speed and not real:
        raise InvalidRequestError("--match-speed needs --compare FILES (the runs whose speed to match)")
    if args.repeats < 1:
        raise InvalidRequestError(f"--repeats must be >= 1, got {args.repeats}")
    runs, table = [], []
    for n in args.instances:
        for policy in args.routing:
            if policy == "accellm" and n % 2:
                continue
            t0 = time.perf_counter()
            cfg = replace(base, policy=policy, num_instances=n)
            compared = real.get((policy, n)) or (real.get(("single", 1)) if n == 1 else None)
            at = _at_speed(cost, compared, policy, n) if args.match_speed and compared else cost
            res = simulate(cfg, at, trace, prompts)
            entry = res.to_json(per_request=args.per_request)
            others = [simulate(replace(cfg, seed=cfg.seed + k), at, trace, prompts).summary()
                      for k in range(1, args.repeats)]
            entry["prediction"] = median_figures([entry["summary"], *others])
            entry["summary"]["sim_wall_s"] = time.perf_counter() - t0
            entry["speed"] = at.speed
            if compared:
                measured = _measured(compared)
                entry["vs_real"] = compare(entry["prediction"], measured)
                entry["compared_runs"] = len(compared)
                label = f"{policy} x{n}" + (f" ({len(compared)} runs)" if len(compared) > 1 else "")
                table.append((label, entry["prediction"], measured))
            runs.append(entry)
            print(f"sim {policy} x{n}: done in {entry['summary']['sim_wall_s']:.1f}s", file=sys.stderr)
    if table:
        print(comparison_table(table), file=sys.stderr)
    return {"trace": spec.__dict__, "sim": {k: v for k, v in base.__dict__.items() if k != "policy_options"},
            "cost_model": cost.to_json(), "repeats": args.repeats, "runs": runs}
