"""`tessera bench latency`: model load time, then single-sequence prefill and decode speed."""

from __future__ import annotations

import json
import statistics
import time


def bench_latency(args) -> dict:
    from tessera import LLM, SamplingParams
    from tessera.bench.compare import (
        SETTLE_S,
        cpu_flags,
        describe_cpu,
        find_vllm_python,
        medians_and_ratio,
        runner_record,
        start_vllm_runner,
        vllm_dtype,
    )
    from tessera.config import engine_kwargs

    other = getattr(args, "compare", None)  # None, "vllm" or "llama.cpp"
    if other == "vllm":
        find_vllm_python(args.vllm_python)  # fail before anything loads
    elif other == "llama.cpp":
        from tessera.bench.llamacpp import find_llamacpp_python, gguf_for, start_llamacpp_runner

        find_llamacpp_python(getattr(args, "llamacpp_python", None))
        gguf_for(args.model)
    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    load_s = time.perf_counter() - t0
    eng = llm.engine
    prompt = [(7 * i) % 1000 + 100 for i in range(args.prompt_len)]
    llm.generate([prompt[:8]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    runner = None
    if other == "llama.cpp":  # the same token ids, greedy, never stopping, one stream, tessera's thread count
        import torch

        runner = start_llamacpp_runner(args, prompt, args.output_len, torch.get_num_threads())
    elif other == "vllm":  # the same prompt, greedy, ignore_eos, one stream
        runner = start_vllm_runner(args, eng.model_path, {
            "mode": "latency", "model": str(eng.model_path), "dtype": vllm_dtype(args.dtype), "seed": args.seed,
            "max_model_len": args.max_model_len, "prompt": prompt, "output_len": args.output_len,
            "rounds": args.repeats}, tokens=args.prompt_len + args.output_len)
    prefill, decode, runs = [], [], []
    try:
        for rnd in range(args.repeats):
            if runner is not None and runs:
                time.sleep(SETTLE_S)  # vLLM's idle workers poll for ~1 s after a request: let the cores settle
            eng.block_manager.reset_prefix_cache()  # a cold prefill each round (the prompt repeats)
            eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True))
            t = time.perf_counter()
            eng.step()  # the whole prompt (it fits the token budget) and the first token
            first = time.perf_counter()
            while eng.has_unfinished_requests():
                eng.step()
            end = time.perf_counter()
            prefill.append(args.prompt_len / (first - t))
            decode.append((args.output_len - 1) / (end - first))
            runs.append({"backend": "tessera", "round": rnd, "prefill_tok_s": round(prefill[-1], 1),
                         "decode_tok_s": round(decode[-1], 1)})
            if runner is not None:
                print(json.dumps(runs[-1]), flush=True)
                time.sleep(SETTLE_S)
                v = runner.run_round()
                runs.append({"backend": other, "round": rnd, "prefill_tok_s": round(v["prefill_tok_s"], 1),
                             "decode_tok_s": round(v["decode_tok_s"], 1)})
                print(json.dumps(runs[-1]), flush=True)
    finally:
        other_record = runner_record(runner) if runner is not None else None
        if runner is not None:
            runner.close()
    result = {"bench": "latency", "model": str(eng.model_path), "device": str(eng.device),
              "dtype": str(eng.dtype).removeprefix("torch."), "load_s": round(load_s, 2),
              "load_s_note": "engine construction incl. weight loading (the one-time GGUF conversion excluded "
                             "once cached)",
              "prompt_len": args.prompt_len, "output_len": args.output_len,
              "prefill_tok_s": round(statistics.median(prefill), 1),
              "decode_tok_s": round(statistics.median(decode), 1), "repeats": args.repeats, "cpu": cpu_flags()}
    if runner is not None:
        other_dtype = other_record["engine"].get("dtype", "the GGUF's own blocks")
        result.update({"compare": other, "runs": runs, "dtypes": {"tessera": str(eng.dtype), other: other_dtype}})
        if other == "llama.cpp":
            result["quantization"] = eng.config.quantization
        for key in ("prefill_tok_s", "decode_tok_s"):
            result.update(medians_and_ratio(runs, key, b=other))
        result[other] = other_record
        print(f"median decode tok/s: tessera {result['tessera_median_decode_tok_s']}, {other} "
              f"{result[f'{other}_median_decode_tok_s']} (tessera/{other} "
              f"{result[f'decode_tok_s_ratio_tessera_over_{other}']}x); prefill tok/s: tessera "
              f"{result['tessera_median_prefill_tok_s']}, {other} {result[f'{other}_median_prefill_tok_s']} "
              f"({result[f'prefill_tok_s_ratio_tessera_over_{other}']}x); {args.repeats} alternating rounds\n"
              f"{describe_cpu(result['cpu'])}", flush=True)
    return result
