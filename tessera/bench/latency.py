"""`tessera bench latency`: model load time, then single-sequence prefill and decode speed."""

from __future__ import annotations

import statistics
import time


def bench_latency(args) -> dict:
    from tessera import LLM, SamplingParams
    from tessera.config import engine_kwargs

    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    load_s = time.perf_counter() - t0
    eng = llm.engine
    prompt = [(7 * i) % 1000 + 100 for i in range(args.prompt_len)]
    llm.generate([prompt[:8]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    prefill, decode = [], []
    for _ in range(args.repeats):
        eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True))
        t = time.perf_counter()
        eng.step()  # the whole prompt (it fits the token budget) and the first token
        first = time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
        end = time.perf_counter()
        prefill.append(args.prompt_len / (first - t))
        decode.append((args.output_len - 1) / (end - first))
    return {"bench": "latency", "model": str(eng.model_path), "device": str(eng.device),
            "dtype": str(eng.dtype).removeprefix("torch."), "load_s": round(load_s, 2),
            "load_s_note": "engine construction incl. weight loading (the one-time GGUF conversion excluded "
                           "once cached)",
            "prompt_len": args.prompt_len, "output_len": args.output_len,
            "prefill_tok_s": round(statistics.median(prefill), 1),
            "decode_tok_s": round(statistics.median(decode), 1), "repeats": args.repeats}
