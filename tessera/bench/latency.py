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

    if getattr(args, "compare", None) == "vllm":
        find_vllm_python(args.vllm_python)  # fail before anything loads
    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    load_s = time.perf_counter() - t0
    eng = llm.engine
    prompt = [(7 * i) % 1000 + 100 for i in range(args.prompt_len)]
    llm.generate([prompt[:8]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    runner = None
    if getattr(args, "compare", None) == "vllm":  # the same prompt, greedy, ignore_eos, one stream
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
                runs.append({"backend": "vllm", "round": rnd, "prefill_tok_s": round(v["prefill_tok_s"], 1),
                             "decode_tok_s": round(v["decode_tok_s"], 1)})
                print(json.dumps(runs[-1]), flush=True)
    finally:
        vllm_record = runner_record(runner) if runner is not None else None
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
        result.update({"compare": "vllm", "runs": runs, "dtypes": {"tessera": str(eng.dtype),
                                                                  "vllm": vllm_record["engine"]["dtype"]}})
        for key in ("prefill_tok_s", "decode_tok_s"):
            result.update(medians_and_ratio(runs, key))
        result["vllm"] = vllm_record
        print(f"median decode tok/s: tessera {result['tessera_median_decode_tok_s']}, vLLM "
              f"{result['vllm_median_decode_tok_s']} (tessera/vLLM {result['decode_tok_s_ratio_tessera_over_vllm']}x); "
              f"prefill tok/s: tessera {result['tessera_median_prefill_tok_s']}, vLLM "
              f"{result['vllm_median_prefill_tok_s']} ({result['prefill_tok_s_ratio_tessera_over_vllm']}x); "
              f"{args.repeats} alternating rounds\n{describe_cpu(result['cpu'])}", flush=True)
    return result
