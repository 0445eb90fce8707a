"""`tessera bench throughput`: nano-vllm's bench. Seeded random token-id prompts, temperature 0.6,
ignore_eos; reports output tok/s and total tok/s, with the roofline fraction of this machine."""

from __future__ import annotations

import json
import random
import statistics
import time

import torch


def workload(num_seqs: int, in_range: tuple[int, int], out_range: tuple[int, int], seed: int = 0):
    """Exactly nano-vllm's bench.py draw order: all prompts first, then all output lengths."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(*in_range))] for _ in range(num_seqs)]
    out_lens = [rng.randint(*out_range) for _ in range(num_seqs)]
    return prompts, out_lens


def workload_flops(cfg, prompts: list[list[int]], out_lens: list[int]) -> float:
    """Matmul FLOPs the workload needs: every token through the layers, attention over its context,
    the LM head for generated tokens only."""
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = 2 * h * (cfg.q_size + 2 * cfg.kv_size) + 2 * cfg.q_size * h
    layers = cfg.num_layers * (attn + 2 * 3 * h * i)
    if cfg.moe is not None:  # sparse layers: the router, the k experts a token takes, the shared expert
        moe = cfg.moe
        sparse = cfg.num_layers - len(moe.dense_layers)
        ffn = 2 * h * moe.num_experts + 2 * 3 * h * (moe.top_k * moe.expert_intermediate_size
                                                     + moe.shared_expert_intermediate_size)
        layers = cfg.num_layers * attn + len(moe.dense_layers) * 2 * 3 * h * i + sparse * ffn
    total = 0.0
    for p, o in zip(prompts, out_lens, strict=True):
        n = len(p) + o
        total += layers * n
        total += cfg.num_layers * 4 * cfg.num_heads * hd * (n * (n + 1) / 2)  # QK^T and PV, causal
        total += 2 * h * cfg.vocab_size * o
    return total


def gemm_rate(device: torch.device, dtype: torch.dtype, m: int = 2048, k: int = 512, n: int = 1536,
              reps: int = 20) -> float:
    """Median FLOP/s of an [m,k]x[k,n] matmul, the shape of this workload's biggest layers."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    times = []
    for _ in range(reps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times[3:])


def run_tessera(llm, prompts, out_lens, temperature: float, lora_request=None) -> float:
    """lora_request: as LLM.generate's (tessera bench lora)."""
    from tessera import SamplingParams

    params = [SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=o) for o in out_lens]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    llm.engine.block_manager.reset_prefix_cache()  # every round starts cold (repeats share the prompts)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora_request)
    elapsed = time.perf_counter() - t0
    assert [len(o.token_ids) for o in outs] == out_lens
    return elapsed


def run_hf(model_path, prompts, out_lens, temperature: float, device: torch.device, dtype: torch.dtype) -> float:
    """The same workload through transformers' continuous batching (`generate_batch`'s manager, so that
    each request keeps its own output length)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    gen = GenerationConfig(do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                           max_new_tokens=max(out_lens), eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        manager = model.init_continuous_batching(generation_config=gen)
        manager.start()
        ids = [manager.add_request(p, request_id=f"r{k}", max_new_tokens=o)
               for k, (p, o) in enumerate(zip(prompts, out_lens, strict=True))]
        produced, finished = 0, set()
        while len(finished) < len(ids):  # results arrive in completion order
            res = manager.get_result(timeout=3600)
            if res is None:
                raise RuntimeError("transformers' continuous-batching manager stopped before finishing")
            if res.is_finished() and res.request_id not in finished:
                finished.add(res.request_id)
                produced += len(res.generated_tokens)
        manager.stop(block=True)
    elapsed = time.perf_counter() - t0
    if produced != sum(out_lens):
        print(f"warning: transformers produced {produced} tokens, expected {sum(out_lens)}")
    return elapsed


def bench_throughput(args) -> dict:
    from tessera import LLM
    from tessera.bench.compare import (
        SETTLE_S,
        cpu_flags,
        describe_cpu,
        find_vllm_python,
        ratio_of_medians,
        runner_record,
        start_vllm_runner,
        vllm_dtype,
    )
    from tessera.bench.random_model import build_random_model
    from tessera.config import engine_kwargs
    from tessera.errors import TesseraError

    if args.compare == "vllm":
        find_vllm_python(args.vllm_python)  # fail before anything loads
    if args.compare_quantization is not None and (args.compare or args.backend == "hf"):
        raise TesseraError("--compare-quantization and --compare: choose one comparison")
    kw = engine_kwargs(args)
    if args.random_model:
        kw["model"] = str(build_random_model(args.random_model))
    on_gpu = (args.device == "cuda") or (args.device == "auto" and torch.cuda.is_available())
    num_seqs = args.num_seqs or (256 if on_gpu else 64)
    in_range = tuple(args.input_len or ((100, 1024) if on_gpu else (100, 512)))
    out_range = tuple(args.output_len or ((100, 1024) if on_gpu else (100, 256)))
    prompts, out_lens = workload(num_seqs, in_range, out_range)
    llm = LLM(**kw)
    eng = llm.engine
    cfg = eng.model_config
    flops = workload_flops(cfg, prompts, out_lens)
    result = {"bench": "throughput", "model": str(eng.model_path), "device": str(eng.device),
              "dtype": str(eng.dtype).removeprefix("torch."), "num_seqs": num_seqs, "input_len": in_range,
              "output_len": out_range, "output_tokens": sum(out_lens),
              "total_tokens": sum(out_lens) + sum(map(len, prompts)), "workload_tflop": round(flops / 1e12, 4),
              "runs": []}
    compare = args.compare or (args.backend if args.backend == "hf" else None)  # --backend hf = --compare hf
    if args.compare and args.backend == "hf" and args.compare != "hf":
        raise TesseraError("--backend hf and --compare vllm: choose one comparison")
    other = None  # --compare-quantization: the same engine with other weights, alternating with this one
    if args.compare_quantization is not None:
        from tessera.bench.latency import parse_compare_quantization, split_activations

        (entry,) = parse_compare_quantization(args.compare_quantization)
        q, act = split_activations(entry, kw.get("activation_bits"))
        other = LLM(**dict(kw, quantization=q, activation_bits=act,
                           quantize_lm_head=kw.get("quantize_lm_head", False) and q is not None))
        compare = "tessera:" + args.compare_quantization
        result["quantization"] = {"tessera": kw.get("quantization"), compare: q}
    repeats = args.repeats or (3 if compare else 1)
    backends = ["tessera"] + ([compare] if compare else [])
    result["cpu"] = cpu_flags()
    runner = None
    if compare == "vllm":  # vLLM loads once here, in its own environment; "auto" dtype = vLLM's own default
        runner = start_vllm_runner(args, eng.model_path, {
            "mode": "throughput", "model": str(eng.model_path), "dtype": vllm_dtype(args.dtype), "seed": args.seed,
            "max_model_len": args.max_model_len, "prompts": prompts, "output_lens": out_lens,
            "temperature": args.temperature, "rounds": repeats}, tokens=result["total_tokens"], seqs=num_seqs)
    try:
        for rep in range(repeats):
            for backend in backends:  # alternate the systems inside one run
                if runner is not None and result["runs"]:
                    time.sleep(SETTLE_S)  # vLLM's idle workers poll for ~1 s after a batch: let the cores settle
                rate = gemm_rate(eng.device, eng.dtype)
                if backend == "tessera":
                    if args.profile and rep == 0:
                        from tessera.bench.profile import profile_run

                        result["profile"] = profile_run(llm, prompts, out_lens, args.temperature)
                    elapsed = run_tessera(llm, prompts, out_lens, args.temperature)
                elif backend == "vllm":
                    elapsed = runner.run_round()["elapsed_s"]
                elif other is not None:
                    elapsed = run_tessera(other, prompts, out_lens, args.temperature)
                else:
                    elapsed = run_hf(str(eng.model_path), prompts, out_lens, args.temperature, eng.device, eng.dtype)
                roof = sum(out_lens) / (flops / rate)
                run = {"backend": backend, "round": rep, "elapsed_s": round(elapsed, 3),
                       "output_tok_s": round(sum(out_lens) / elapsed, 1),
                       "total_tok_s": round(result["total_tokens"] / elapsed, 1),
                       "gemm_gflop_s": round(rate / 1e9, 1), "roofline_output_tok_s": round(roof, 1),
                       "roofline_fraction": round(sum(out_lens) / elapsed / roof, 3)}
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
    finally:
        if runner is not None:
            result["vllm"] = runner_record(runner)
            runner.close()
    for backend in backends:
        runs = [r for r in result["runs"] if r["backend"] == backend]
        result[f"{backend}_median_output_tok_s"] = statistics.median(r["output_tok_s"] for r in runs)
    if other is not None:
        result["ratio_vs_other"] = round(result["tessera_median_output_tok_s"]
                                         / result[f"{compare}_median_output_tok_s"], 3)
        print(f"median output tok/s: tessera ({kw.get('quantization')}) {result['tessera_median_output_tok_s']}, "
              f"{compare} {result[f'{compare}_median_output_tok_s']}; ratio {result['ratio_vs_other']}x "
              f"({repeats} alternating rounds)\n{describe_cpu(result['cpu'])}", flush=True)
    if "hf" in backends:
        result["speedup_vs_hf"] = round(result["tessera_median_output_tok_s"] / result["hf_median_output_tok_s"], 2)
    if runner is not None:
        result["dtypes"] = {"tessera": str(eng.dtype), "vllm": result["vllm"]["engine"]["dtype"]}
        result["ratio_vs_vllm"] = round(ratio_of_medians([r["output_tok_s"] for r in result["runs"]
                                                          if r["backend"] == "tessera"],
                                                         [r["output_tok_s"] for r in result["runs"]
                                                          if r["backend"] == "vllm"]), 3)
        print(f"median output tok/s: tessera {result['tessera_median_output_tok_s']}, "
              f"vLLM {result['vllm_median_output_tok_s']}; tessera/vLLM = {result['ratio_vs_vllm']}x "
              f"({repeats} alternating rounds)\n{describe_cpu(result['cpu'])}", flush=True)
    return result
