"""`tessera bench prefix`: SGLang's generated-shared-prefix workload. G groups x P prompts; every prompt
is its group's S-token system prompt followed by its own Q-token question, and asks for O tokens
(seeded random token ids, greedy, ignore_eos). The prompts are handed over in shuffled order.

Three modes, alternated inside one run, each at two KV budgets:
  none    prefix cache off, planning off (every prompt prefilled whole)
  online  prefix cache on, planning off (FCFS over the shuffled order: the LRU cache finds what it can)
  planned prefix cache on, global prefix planning on (tessera.engine.prefix_planner)
ample: the pool holds every request at once without sharing; tight: it holds about two groups
(their shared prefixes plus their members' own blocks). With --plain-check, also the plain throughput
workload (no shared prefixes) with sharing off and on, to show that sharing costs nothing there."""

from __future__ import annotations

import json
import random
import statistics
import time

import torch

DEFAULTS = [
    ("groups", 16, 64),
    ("prompts_per_group", 8, 16),
    ("system_len", 512, 2048),
    ("question_len", 64, 128),
    ("output_len", 32, 256),
]  # (argument, CPU default, GPU default): DESIGN.md's table
MODES = {"none": (False, "off"), "online": (True, "off"), "planned": (True, "on")}  # caching, planning


def workload(groups: int, per_group: int, system_len: int, question_len: int, vocab: int, seed: int = 0):
    """The prompts, already shuffled (every mode sees the same order)."""
    rng = random.Random(seed)
    hi = min(10000, vocab - 1)
    systems = [[rng.randint(0, hi) for _ in range(system_len)] for _ in range(groups)]
    prompts = [
        systems[g] + [rng.randint(0, hi) for _ in range(question_len)] for g in range(groups) for _ in range(per_group)
    ]
    rng.shuffle(prompts)
    return prompts


def kv_budgets(args, block_size: int) -> dict[str, int]:
    """KV blocks (usable ones) of the two budgets."""
    per_req = -(-(args.system_len + args.question_len + args.output_len) // block_size)
    shared = args.system_len // block_size
    group = shared + args.prompts_per_group * (per_req - shared)  # a group resident, prefix shared once
    return {"tight": round(args.tight_groups * group), "ample": args.groups * args.prompts_per_group * per_req}


def timed_run(llm, prompts, params, mode: str) -> dict:
    caching, planning = MODES[mode]
    bm = llm.engine.block_manager
    bm.reset_prefix_cache()  # every run starts cold
    bm.enable_prefix_caching = caching
    llm.config.prefix_planning = planning
    bm.reset_prefix_stats()
    preempt0, steps0 = llm.engine.scheduler.total_preemptions, llm.engine.stats["steps"]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    assert bm.num_used_blocks == 0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    total = out_tokens + sum(map(len, prompts))
    return {
        "mode": mode,
        "elapsed_s": round(elapsed, 3),
        "output_tok_s": round(out_tokens / elapsed, 1),
        "total_tok_s": round(total / elapsed, 1),
        "prefix_hit_rate": round(bm.prefix_hit_rate, 4),
        "preemptions": llm.engine.scheduler.total_preemptions - preempt0,
        "steps": llm.engine.stats["steps"] - steps0,
        "outputs": [o.outputs[0].token_ids for o in outs],
    }


def bench_prefix(args) -> dict:
    from tessera import LLM, SamplingParams
    from tessera.bench.random_model import build_random_model
    from tessera.config import ModelConfig, engine_kwargs
    from tessera.engine.model_runner import ModelRunner

    kw = engine_kwargs(args)
    on_gpu = (args.device == "cuda") or (args.device == "auto" and torch.cuda.is_available())
    for name, cpu, gpu in DEFAULTS:
        if getattr(args, name) is None:
            setattr(args, name, gpu if on_gpu else cpu)
    if args.random_model:
        kw["model"] = str(build_random_model(args.random_model))
    kw["progress"] = False
    base = LLM(**kw)  # the caller's KV budget: for the plain check
    eng = base.engine
    bs = eng.config.block_size
    per_block = ModelRunner.kv_bytes_per_block(ModelConfig.from_dir(eng.model_path), bs, eng.dtype)
    budgets = {} if args.plain_only else kv_budgets(args, bs)
    llms = {
        name: LLM(**{**kw, "kv_cache_memory": (blocks + 1) * per_block})  # + the reserved null block
        for name, blocks in budgets.items()
    }
    prompts = workload(
        args.groups, args.prompts_per_group, args.system_len, args.question_len, eng.model_config.vocab_size, args.seed
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    result = {
        "bench": "prefix",
        "model": str(eng.model_path),
        "device": str(eng.device),
        "dtype": str(eng.dtype).removeprefix("torch."),
        "workload": {
            "groups": args.groups,
            "prompts_per_group": args.prompts_per_group,
            "system_len": args.system_len,
            "question_len": args.question_len,
            "output_len": args.output_len,
            "block_size": bs,
        },
        "kv_blocks": {name: llm.engine.block_manager.num_blocks for name, llm in llms.items()},
        "kv_bytes_per_block": per_block,
        "runs": [],
    }
    modes = [] if args.plain_only else [m for m in MODES if m in args.modes]
    for llm in llms.values():
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    reference = None
    for _ in range(args.repeats):
        for name, llm in llms.items():
            for mode in modes:  # alternate the modes inside one run
                run = timed_run(llm, prompts, params, mode)
                outputs = run.pop("outputs")
                reference = reference or outputs
                run["kv"] = name
                run["greedy_match"] = round(
                    sum(a == b for a, b in zip(outputs, reference, strict=True)) / len(outputs), 3
                )
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
    summary = {}
    for name in llms:
        med = {
            m: {
                k: round(statistics.median(r[k] for r in result["runs"] if r["kv"] == name and r["mode"] == m), 1)
                for k in ("output_tok_s", "total_tok_s")
            }
            for m in modes
        }
        ratios = {
            f"{a}_vs_{b}": round(med[a]["output_tok_s"] / med[b]["output_tok_s"], 2)
            for a, b in (("planned", "none"), ("planned", "online"), ("online", "none"))
            if a in med and b in med
        }
        summary[name] = {"median": med, "ratios": ratios}
    result["summary"] = summary
    if args.plain_check or args.plain_only:
        result["plain"] = plain_check(base, args)
    return result


def plain_check(llm, args) -> dict:
    """The throughput bench's workload (no shared prefixes), sharing off vs on, alternated."""
    from tessera import SamplingParams
    from tessera.bench.throughput import workload as plain_workload

    prompts, out_lens = plain_workload(args.plain_num_seqs, (100, 512), (100, 256))
    vocab = llm.engine.model_config.vocab_size
    prompts = [[t % vocab for t in p] for p in prompts]  # unchanged for vocabularies above 10000
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=o) for o in out_lens]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    runs = []
    for _ in range(args.repeats):
        for mode in ("none", "planned"):
            run = timed_run(llm, prompts, params, mode)
            run.pop("outputs")
            run["mode"] = "sharing_off" if mode == "none" else "sharing_on"
            runs.append(run)
            print(json.dumps(run), flush=True)
    med = {
        m: round(statistics.median(r["output_tok_s"] for r in runs if r["mode"] == m), 1)
        for m in ("sharing_off", "sharing_on")
    }
    pairs = [on["output_tok_s"] / off["output_tok_s"] for off, on in zip(runs[::2], runs[1::2], strict=True)]
    return {
        "num_seqs": args.plain_num_seqs,
        "runs": runs,
        "median_output_tok_s": med,
        "on_vs_off": round(med["sharing_on"] / med["sharing_off"], 3),
        "on_vs_off_median_of_pairs": round(statistics.median(pairs), 3),
    }


def add_prefix_args(sub) -> None:
    from tessera.config import add_engine_args

    p = sub.add_parser("prefix", help="SGLang's generated-shared-prefix workload: no sharing / online / planned")
    for name, cpu, gpu in DEFAULTS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"default {cpu} (CPU), {gpu} (GPU)")
    p.add_argument(
        "--tight-groups",
        type=float,
        default=2.0,
        help="the tight KV budget holds this many groups (shared prefix + members' own blocks)",
    )
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument(
        "--random-model",
        nargs="?",
        const="reference",
        default=None,
        help="build a random-weight model: 'reference' (DESIGN.md) or 'qwen3-0.6b'",
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--plain-check", action="store_true", help="also run the plain throughput workload with sharing off and on"
    )
    p.add_argument("--plain-only", action="store_true", help="run only the plain-workload check")
    p.add_argument("--plain-num-seqs", type=int, default=64)
    p.add_argument("--json-out", default=None)
    add_engine_args(p)
