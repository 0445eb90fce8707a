"""`tessera bench blockllm`: several full fine-tunes on one engine with block sharing (tessera.blockllm)
against one engine per variant, side by side in one run (issue 18).

Variants: `--num-variants` copies of the model (default: the default model), each with the same 25% of
its blocks perturbed by its own seed (so they share the other 75% with each other): the four linears
(q/k/v, o, gate/up, down) of the last `--perturbed-layers` decoder layers (default 11 of SmolLM2's 30:
44 blocks) and the final norm; 45 of the default model's 182 blocks (30 x 6, the embeddings, the final
norm; the LM head is tied), 29% of its weights. Perturbation: w + 0.02 * std(w) * N(0, 1), which keeps the
model sane. Written once (bf16 safetensors) under $TESSERA_CACHE_DIR/blockllm-bench.

Workload: `--num-requests` random token-id prompts (U[in_lo, in_hi]) with output lengths U[out_lo, out_hi]
(`ignore_eos`, temperature 0.6), each on a variant (round robin over a shuffled order), arriving as a
Poisson process at `--request-rate`. Both systems get the same arrivals in one process, driven by the
same loop: requests are added when their arrival time has passed, then engines step.

- shared: one engine, `LLM(models={...})`: requests of all variants batched together.
- separate: one engine per variant, in the same process; every loop steps each engine that has work
  once, in turn (the CPU is time-shared between the models, as per-model serving on one machine would).
  Every engine gets 1/N of the shared engine's KV cache budget.

Reported per system: e2e latency (arrival to last token) p50/p95, TTFT p95, output tok/s (output tokens
over the time from the first arrival to the last finish), and resident weight bytes: the distinct
tensors the engines hold for weights (parameters, oneDNN-packed copies, per-variant versions), counted
once per storage, plus the process RSS growth when the system was built. Rounds alternate the systems.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

HF_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")


def add_blockllm_bench_args(sub) -> None:
    from tessera.config import add_engine_args

    p = sub.add_parser("blockllm", help="block sharing across full fine-tunes against one engine per variant")
    p.add_argument("--num-variants", type=int, default=4)
    p.add_argument("--perturbed-layers", type=int, default=11, help="the last N layers' linears differ per variant")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=4.0, help="Poisson arrivals, requests per second")
    p.add_argument("--input-len", type=int, nargs=2, default=(100, 300), metavar=("LO", "HI"))
    p.add_argument("--output-len", type=int, nargs=2, default=(50, 150), metavar=("LO", "HI"))
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--kv-total", type=int, default=2 << 30, help="KV cache bytes, shared engine (each separate: 1/N)")
    p.add_argument("--repeats", type=int, default=2, help="rounds (each: shared, separate)")
    p.add_argument("--json-out", default=None)
    add_engine_args(p)


def make_variants(model_dir: Path, n: int, layers: int) -> tuple[list[Path], list[str]]:
    """n perturbed copies of the checkpoint at model_dir (cached); returns them and the perturbed HF names."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from tessera.config import ModelConfig
    from tessera.models.default_model import cache_dir

    cfg = ModelConfig.from_dir(model_dir)
    first = cfg.num_layers - layers
    names = [f"model.layers.{i}.{m}.weight" for i in range(first, cfg.num_layers) for m in HF_LINEARS]
    names.append("model.norm.weight")
    root = cache_dir() / "blockllm-bench"
    out = [root / f"{model_dir.name}-last{layers}-v{k}" for k in range(n)]
    todo = [(k, d) for k, d in enumerate(out) if not (d / "model.safetensors").is_file()]
    if todo:
        src = {k: v.to(torch.bfloat16) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
        for k, d in todo:
            tmp = d.with_suffix(".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns("*.safetensors", "tessera_*"))
            g = torch.Generator().manual_seed(2000 + k)
            tensors = dict(src)
            for name in names:
                w = src[name].float()
                tensors[name] = (w + 0.02 * w.std() * torch.randn(w.shape, generator=g)).to(torch.bfloat16)
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tmp.rename(d)
    return out, names


def weight_bytes(engines) -> int:
    """Bytes of the distinct tensors holding weights in `engines` (each storage once)."""
    from tessera.ops.linear import Linear

    seen: dict[int, int] = {}

    def add(t) -> None:
        if t is None or not t.numel():
            return
        if t.is_mkldnn:  # oneDNN's packed copy is opaque: as many elements as the weight, same dtype
            seen[id(t)] = t.numel() * t.element_size()
        else:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for eng in engines:
        model = eng.model
        for p in model.parameters():
            add(p)
        for m in model.modules():
            if isinstance(m, Linear):
                add(m.packed_weight)
                for h in getattr(m, "variant_versions", [])[1:]:
                    add(h.weight)
                    add(h.bias)
                    add(h.packed_weight)
            for t in getattr(m, "version_weights", [])[1:]:
                add(t)
            add(getattr(m, "stacked", None))
    return sum(seen.values())


def rss() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def drive(engines: list, target, arrivals: list[float], prompts, params) -> dict:
    """Add request k to engines[i] with keywords kw, (i, kw) = target(k), once arrivals[k] has passed;
    step the engines with work, in turn, until all finish. Returns latency percentiles."""
    n = len(prompts)
    start = time.monotonic()
    rid_of: dict[tuple[int, str], int] = {}
    done: dict[int, tuple[float, float]] = {}
    nxt = 0
    while len(done) < n:
        now = time.monotonic() - start
        while nxt < n and arrivals[nxt] <= now:
            i, extra = target(nxt)
            rid_of[(i, engines[i].add_request(None, params[nxt], prompt_token_ids=prompts[nxt], **extra))] = nxt
            nxt += 1
        busy = [(i, e) for i, e in enumerate(engines) if e.has_unfinished_requests()]
        if not busy:
            time.sleep(max(0.0, min(arrivals[nxt] - now, 0.05)))
            continue
        for i, e in busy:
            for out in e.step():
                if out.finished:
                    k = rid_of.pop((i, out.request_id))
                    m = out.metrics
                    done[k] = (m["first_token_time"] - start - arrivals[k], m["finish_time"] - start - arrivals[k])
    end = time.monotonic() - start
    ttft = [done[k][0] for k in range(n)]
    e2e = [done[k][1] for k in range(n)]
    q = statistics.quantiles
    return {"e2e_p50_s": round(statistics.median(e2e), 3), "e2e_p95_s": round(q(e2e, n=20)[18], 3),
            "ttft_p95_s": round(q(ttft, n=20)[18], 3), "makespan_s": round(end, 3)}


def bench_blockllm(args) -> dict:
    import gc

    from tessera import LLM, SamplingParams
    from tessera.bench.compare import cpu_flags, describe_cpu
    from tessera.bench.throughput import workload
    from tessera.config import engine_kwargs
    from tessera.models.loader import resolve_model_path

    kw = {k: v for k, v in engine_kwargs(args).items() if k not in ("model", "models", "kv_cache_memory")}
    base_dir = resolve_model_path(args.model)
    paths, perturbed = make_variants(base_dir, args.num_variants, args.perturbed_layers)
    names = [f"v{k}" for k in range(args.num_variants)]
    prompts, out_lens = workload(args.num_requests, tuple(args.input_len), tuple(args.output_len))
    rng = random.Random(1)
    route = [k % args.num_variants for k in range(args.num_requests)]
    rng.shuffle(route)
    t, arrivals = 0.0, []
    for _ in range(args.num_requests):
        t += rng.expovariate(args.request_rate)
        arrivals.append(t)
    params = [SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=o) for o in out_lens]

    gc.collect()
    r0 = rss()
    shared = LLM(models=dict(zip(names, map(str, paths), strict=True)), kv_cache_memory=args.kv_total,
                 progress=False, **kw)
    shared_rss = rss() - r0
    r0 = rss()
    separate = [LLM(str(p), kv_cache_memory=args.kv_total // args.num_variants, progress=False, **kw) for p in paths]
    separate_rss = rss() - r0
    shared_eng, sep_engs = shared.engine, [s.engine for s in separate]
    stats = shared_eng.variants.stats
    result = {"bench": "blockllm", "model": str(base_dir), "dtype": str(shared_eng.dtype).removeprefix("torch."),
              "num_variants": args.num_variants, "perturbed": {"hf_tensors": len(perturbed),
                                                               "layers": args.perturbed_layers},
              "blocks": stats, "num_requests": args.num_requests, "request_rate": args.request_rate,
              "input_len": list(args.input_len), "output_len": list(args.output_len),
              "output_tokens": sum(out_lens), "kv_total_bytes": args.kv_total,
              "weight_bytes": {"shared": weight_bytes([shared_eng]), "separate": weight_bytes(sep_engs)},
              "rss_growth_at_build_bytes": {"shared": shared_rss, "separate": separate_rss},
              "cpu": cpu_flags(), "runs": []}
    print(json.dumps({"blocks": stats, "weight_bytes": result["weight_bytes"],
                      "rss_growth_at_build_bytes": result["rss_growth_at_build_bytes"]}), flush=True)
    warm = SamplingParams(max_tokens=4)
    for llm, model in [(shared, names[1]), *[(s, None) for s in separate]]:
        llm.generate([[1, 2, 3]], warm, use_tqdm=False, model=model)
    for rnd in range(args.repeats):
        for system in ("shared", "separate"):
            engines = [shared_eng] if system == "shared" else sep_engs
            for e in engines:
                e.block_manager.reset_prefix_cache()
            target = (lambda k: (0, {"model": names[route[k]]})) if system == "shared" else (lambda k: (route[k], {}))
            run = drive(engines, target, arrivals, prompts, params)
            run.update(system=system, round=rnd, output_tok_s=round(sum(out_lens) / run["makespan_s"], 1))
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
    med = {s: {k: statistics.median(r[k] for r in result["runs"] if r["system"] == s)
               for k in ("e2e_p50_s", "e2e_p95_s", "ttft_p95_s", "output_tok_s")} for s in ("shared", "separate")}
    result["medians"] = med
    result["ratios_shared_over_separate"] = {k: round(med["shared"][k] / med["separate"][k], 3) for k in med["shared"]}
    wb = result["weight_bytes"]
    result["ratios_shared_over_separate"]["weight_bytes"] = round(wb["shared"] / wb["separate"], 3)
    print(f"weights {wb['shared'] / 2**20:.0f} MiB shared vs {wb['separate'] / 2**20:.0f} MiB separate; "
          f"p95 e2e {med['shared']['e2e_p95_s']} s vs {med['separate']['e2e_p95_s']} s; output tok/s "
          f"{med['shared']['output_tok_s']} vs {med['separate']['output_tok_s']}\n{describe_cpu(result['cpu'])}",
          flush=True)
    return result
