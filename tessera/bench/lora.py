"""`tessera bench lora`: multi-LoRA throughput against the base model alone (issue 18).

The throughput bench's workload (tessera.bench.throughput.workload: 64 sequences on CPU, prompts
U[100, 512], outputs U[100, 256], random token ids, temperature 0.6, ignore_eos) runs on the base model
alone and with every request on one of `--num-adapters` random PEFT adapters (rank `--rank`, targets
q/k/v/o/gate/up/down), spread uniformly and skewed (Zipf: adapter k drawn with weight 1 / (k+1)^s,
fixed seed), rounds alternating base, uniform, skewed. The base runs on a plain engine (no LoRA at
all); the adapters on one with `enable_lora`, max_loras = the number of adapters unless given. Both use
the same dtype (--dtype; auto = bf16 on CPUs with native bf16). `--compare vllm` runs vLLM's CPU build
with enable_lora on the same adapters and the same spreads in its own environment, alternating.

The adapters are built once with peft from the model's HF directory (random A and B: PEFT starts B at
zero) and cached under $TESSERA_CACHE_DIR/lora-bench.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora_bench_args(sub) -> None:
    from tessera.bench.compare import add_compare_args
    from tessera.config import add_engine_args

    p = sub.add_parser("lora", help="multi-LoRA throughput against the base model alone")
    p.add_argument("--num-seqs", type=int, default=None, help="default 64 on CPU, 256 on GPU")
    p.add_argument("--input-len", type=int, nargs=2, default=None, metavar=("LO", "HI"))
    p.add_argument("--output-len", type=int, nargs=2, default=None, metavar=("LO", "HI"))
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--zipf", type=float, default=1.0, help="the skewed spread's exponent s")
    p.add_argument("--repeats", type=int, default=3, help="rounds (each: base, uniform, skewed)")
    p.add_argument("--vllm-rounds", type=int, default=None,
                   help="with --compare vllm, the first N rounds only (its LoRA path is slow on CPUs; default: all)")
    p.add_argument("--json-out", default=None)
    add_engine_args(p)
    p.set_defaults(max_loras=None)  # --max-loras: default the number of adapters (every one resident)
    add_compare_args(p, ("vllm",))


def make_adapters(model_dir: Path, n: int, rank: int) -> list[Path]:
    """n random rank-`rank` PEFT adapters for the model at model_dir (cached)."""
    from tessera.models.default_model import cache_dir

    root = cache_dir() / "lora-bench"
    out = [root / f"{model_dir.name}-r{rank}-{k}" for k in range(n)]
    todo = [(k, d) for k, d in enumerate(out) if not (d / "adapter_model.safetensors").is_file()]
    if todo:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for k, d in todo:
            model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS)))
            g = torch.Generator().manual_seed(1000 + k)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            model.save_pretrained(d)
            base = model.unload()  # the base model back, without this adapter's layers
    return out


def spreads(num_seqs: int, n: int, s: float, seed: int = 0) -> dict[str, list[int]]:
    """Each request's adapter: uniform (round robin over a shuffled order) and Zipf-skewed."""
    rng = random.Random(seed)
    uniform = [k % n for k in range(num_seqs)]
    rng.shuffle(uniform)
    weights = [1 / (k + 1) ** s for k in range(n)]
    skewed = rng.choices(range(n), weights=weights, k=num_seqs)
    return {"uniform": uniform, "skewed": skewed}


def bench_lora(args) -> dict:
    import torch

    from tessera import LLM, LoRARequest
    from tessera.bench.compare import (
        SETTLE_S,
        cpu_flags,
        describe_cpu,
        find_vllm_python,
        runner_record,
        start_vllm_runner,
        vllm_dtype,
    )
    from tessera.bench.throughput import run_tessera, workload
    from tessera.config import engine_kwargs

    if args.compare == "vllm":
        find_vllm_python(args.vllm_python)
    kw = engine_kwargs(args)
    on_gpu = (args.device == "cuda") or (args.device == "auto" and torch.cuda.is_available())
    num_seqs = args.num_seqs or (256 if on_gpu else 64)
    in_range = tuple(args.input_len or ((100, 1024) if on_gpu else (100, 512)))
    out_range = tuple(args.output_len or ((100, 1024) if on_gpu else (100, 256)))
    prompts, out_lens = workload(num_seqs, in_range, out_range)
    base = LLM(**{**kw, "enable_lora": False, "max_loras": 4})
    model_dir = base.engine.model_path
    adapters = make_adapters(model_dir, args.num_adapters, args.rank)
    max_loras = kw.get("max_loras") or args.num_adapters
    lora = LLM(**{**kw, "enable_lora": True, "max_loras": max_loras, "max_lora_rank": max(args.rank, 16)})
    reqs = [LoRARequest(f"adapter-{k}", k + 1, str(d)) for k, d in enumerate(adapters)]
    sets = spreads(num_seqs, args.num_adapters, args.zipf)
    eng = base.engine
    result = {"bench": "lora", "model": str(model_dir), "device": str(eng.device),
              "dtype": str(eng.dtype).removeprefix("torch."), "num_seqs": num_seqs, "input_len": in_range,
              "output_len": out_range, "output_tokens": sum(out_lens), "num_adapters": args.num_adapters,
              "rank": args.rank, "max_loras": max_loras, "targets": list(TARGETS), "zipf_s": args.zipf,
              "requests_per_adapter": {k: [v.count(a) for a in range(args.num_adapters)] for k, v in sets.items()},
              "cpu": cpu_flags(), "runs": []}
    systems = ["base", "uniform", "skewed"]
    runner = None
    if args.compare == "vllm":
        from tessera.bench.compare import ExternalRunnerError

        try:
            runner = start_vllm_runner(args, model_dir, {
            "mode": "throughput", "model": str(model_dir), "dtype": vllm_dtype(args.dtype), "seed": args.seed,
            "max_model_len": args.max_model_len, "prompts": prompts, "output_lens": out_lens,
            "temperature": args.temperature, "rounds": args.repeats,
            "engine_kwargs": {"enable_lora": True, "max_loras": max_loras, "max_lora_rank": max(args.rank, 16)},
            "loras": [{"name": r.lora_name, "id": r.lora_int_id, "path": r.lora_path} for r in reqs],
            "lora_sets": sets}, tokens=sum(out_lens) + sum(map(len, prompts)), seqs=num_seqs)
            systems += ["vllm-uniform", "vllm-skewed"]
        except ExternalRunnerError as e:  # recorded: vLLM's CPU build may refuse LoRA
            result["vllm_error"] = str(e)
            print(f"vLLM with LoRA failed to start: {e}", flush=True)
    try:
        for rnd in range(args.repeats):
            for system in systems:
                if runner is not None and result["runs"]:
                    time.sleep(SETTLE_S)
                if system == "base":
                    elapsed = run_tessera(base, prompts, out_lens, args.temperature)
                elif system.startswith("vllm-"):
                    if "vllm_error" in result or rnd >= (args.vllm_rounds or args.repeats):
                        continue
                    try:
                        elapsed = runner.run_round(system.removeprefix("vllm-"))["elapsed_s"]
                    except ExternalRunnerError as e:
                        result["vllm_error"] = str(e)
                        print(f"vLLM with LoRA failed: {e}", flush=True)
                        continue
                else:
                    swaps = lora.engine.lora.swaps
                    elapsed = run_tessera(lora, prompts, out_lens, args.temperature,
                                          lora_request=[reqs[k] for k in sets[system]])
                run = {"system": system, "round": rnd, "elapsed_s": round(elapsed, 3),
                       "output_tok_s": round(sum(out_lens) / elapsed, 1)}
                if system in ("uniform", "skewed"):
                    run["adapter_swaps"] = lora.engine.lora.swaps - swaps
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
    finally:
        if runner is not None:
            result["vllm"] = runner_record(runner)
            runner.close()
    systems = [s for s in systems if any(r["system"] == s for r in result["runs"])]
    med = {s: statistics.median(r["output_tok_s"] for r in result["runs"] if r["system"] == s) for s in systems}
    result["median_output_tok_s"] = med
    result["ratio_vs_base"] = {s: round(med[s] / med["base"], 3) for s in ("uniform", "skewed")}
    if "vllm-uniform" in med:
        result["ratio_vs_vllm"] = {s: round(med[s] / med[f"vllm-{s}"], 3) for s in ("uniform", "skewed")}
        result["dtypes"] = {"tessera": str(eng.dtype), "vllm": result["vllm"]["engine"]["dtype"]}
    print(f"median output tok/s: base {med['base']}, {args.num_adapters} adapters uniform {med['uniform']} "
          f"({result['ratio_vs_base']['uniform']}x base), skewed {med['skewed']} "
          f"({result['ratio_vs_base']['skewed']}x base)"
          + (f"; vLLM uniform {med['vllm-uniform']}, skewed {med['vllm-skewed']}" if "vllm-uniform" in med else "")
          + f"\n{describe_cpu(result['cpu'])}", flush=True)
    return result
