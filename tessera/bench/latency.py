"""`tessera bench latency`: model load time, then single-sequence prefill and decode speed.

`--compare-quantization Q[,Q...]` adds tessera engines that differ only in their weights (bits:3,bits:2,
none) and runs them in the same rounds as the first, so that widths are compared on the same machine
state: each round runs every engine once, the order rotating from round to round (4 3 2, 3 2 4, 2 4 3,
...) so that no engine always runs first or last, then the other system (--compare) if any. Besides the
medians, each extra engine gets its per-round ratio to the first (same round, so a slow moment of the
machine hits both sides of a ratio) and the number of rounds it won."""

from __future__ import annotations

import json
import statistics
import time


def _tessera_round(eng, prompt: list[int], output_len: int) -> dict:
    """One cold single-stream request: prefill tok/s (the first step: the whole prompt and the first
    token) and decode tok/s (the remaining output_len - 1 tokens)."""
    from tessera import SamplingParams

    eng.block_manager.reset_prefix_cache()  # a cold prefill each round (the prompt repeats)
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    t = time.perf_counter()
    eng.step()
    first = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    end = time.perf_counter()
    return {"prefill_tok_s": round(len(prompt) / (first - t), 1),
            "decode_tok_s": round((output_len - 1) / (end - first), 1)}


def paired_ratios(runs: list[dict], base: str, other: str, key: str = "decode_tok_s") -> dict:
    """`other` against `base` round by round (the runs of one round share the machine's state): the
    per-round ratios other / base, their median, the rounds `other` won, and the ratio of medians."""
    by_round = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["backend"]] = r[key]
    from tessera.bench.compare import ratio_of_medians

    ratios = [round(v[other] / v[base], 3) for _, v in sorted(by_round.items()) if other in v and base in v]
    of_medians = ratio_of_medians((r[key] for r in runs if r["backend"] == other),
                                  (r[key] for r in runs if r["backend"] == base))
    return {"per_round": ratios, "median_of_ratios": round(statistics.median(ratios), 3),
            "rounds_won": sum(x > 1 for x in ratios), "rounds": len(ratios),
            "ratio_of_medians": round(of_medians, 3)}


ACTIVATION_SUFFIXES = {"a8": 8, "exact": None}  # a --compare-quantization entry's +suffix: its --activation-bits


def parse_compare_quantization(value: str | None) -> list[str | None]:
    """'bits:3,bits:2,none' -> ['bits:3', 'bits:2', None] (none: full-width weights). An entry may end in
    '+a8' (int8 activations) or '+exact' (exact products); otherwise it takes the main engine's
    --activation-bits (see split_activations)."""
    from tessera.errors import InvalidRequestError

    if not value:
        return []
    items = [v.strip() for v in value.split(",")]
    if any(not v for v in items):
        raise InvalidRequestError(f"--compare-quantization: empty entry in {value!r}")
    for v in items:
        if "+" in v and (v.startswith("none") or v.split("+", 1)[1] not in ACTIVATION_SUFFIXES):
            raise InvalidRequestError(f"--compare-quantization: {v!r}: a quantization may end in +a8 or +exact only")
    return [None if v == "none" else v for v in items]


def split_activations(entry: str | None, main_bits: int | None) -> tuple[str | None, int | None]:
    """A --compare-quantization entry as (quantization, activation_bits)."""
    if entry is None:
        return None, None
    q, _, act = entry.partition("+")
    return q, ACTIVATION_SUFFIXES.get(act, main_bits)


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
    extra_q = parse_compare_quantization(getattr(args, "compare_quantization", None))
    if other == "vllm":
        find_vllm_python(args.vllm_python)  # fail before anything loads
    elif other == "llama.cpp":
        from tessera.bench.llamacpp import find_llamacpp_python, gguf_for, start_llamacpp_runner

        find_llamacpp_python(getattr(args, "llamacpp_python", None))
        gguf_for(args.model)
    kw = engine_kwargs(args)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    load_s = time.perf_counter() - t0
    eng = llm.engine
    # The engines compared with the first: the same flags, other weights (a full-width one keeps its LM head).
    llms = {"tessera": llm}
    for entry in extra_q:
        q, act = split_activations(entry, kw.get("activation_bits"))
        head = kw.get("quantize_lm_head", False) and q is not None
        llms["tessera:" + (entry or "none")] = LLM(**dict(kw, quantization=q, activation_bits=act,
                                                          quantize_lm_head=head))
    prompt = [(7 * i) % 1000 + 100 for i in range(args.prompt_len)]
    for each in llms.values():  # warm-up
        each.generate([prompt[:8]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    engines = {name: each.engine for name, each in llms.items()}
    runner = None
    if other == "llama.cpp":  # the same token ids, greedy, never stopping, one stream, tessera's thread count
        import torch

        runner = start_llamacpp_runner(args, prompt, args.output_len, torch.get_num_threads())
    elif other == "vllm":  # the same prompt, greedy, ignore_eos, one stream
        runner = start_vllm_runner(args, eng.model_path, {
            "mode": "latency", "model": str(eng.model_path), "dtype": vllm_dtype(args.dtype), "seed": args.seed,
            "max_model_len": args.max_model_len, "prompt": prompt, "output_len": args.output_len,
            "rounds": args.repeats}, tokens=args.prompt_len + args.output_len)
    runs = []
    names = list(engines)
    try:
        for rnd in range(args.repeats):
            if runner is not None and runs:
                time.sleep(SETTLE_S)  # vLLM's idle workers poll for ~1 s after a request: let the cores settle
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:  # the order rotates
                runs.append({"backend": name, "round": rnd, **_tessera_round(engines[name], prompt, args.output_len)})
                print(json.dumps(runs[-1]), flush=True)
            if runner is not None:
                time.sleep(SETTLE_S)
                v = runner.run_round()
                runs.append({"backend": other, "round": rnd, "prefill_tok_s": round(v["prefill_tok_s"], 1),
                             "decode_tok_s": round(v["decode_tok_s"], 1)})
                print(json.dumps(runs[-1]), flush=True)
    finally:
        other_record = runner_record(runner) if runner is not None else None
        if runner is not None:
            runner.close()
    mine = [r for r in runs if r["backend"] == "tessera"]
    result = {"bench": "latency", "model": str(eng.model_path), "device": str(eng.device),
              "dtype": str(eng.dtype).removeprefix("torch."), "load_s": round(load_s, 2),
              "load_s_note": "engine construction incl. weight loading (the one-time GGUF conversion excluded "
                             "once cached)",
              "prompt_len": args.prompt_len, "output_len": args.output_len,
              "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in mine),
              "decode_tok_s": statistics.median(r["decode_tok_s"] for r in mine), "repeats": args.repeats,
              "cpu": cpu_flags(), "runs": runs, "quantization": eng.config.quantization}
    if extra_q:
        result["widths"] = {}
        for name in names[1:]:
            result["widths"][name] = {key: paired_ratios(runs, "tessera", name, key)
                                      for key in ("decode_tok_s", "prefill_tok_s")}
            med = statistics.median(r["decode_tok_s"] for r in runs if r["backend"] == name)
            d = result["widths"][name]["decode_tok_s"]
            print(f"decode tok/s {name} {med} against tessera ({eng.config.quantization}) {result['decode_tok_s']}: "
                  f"per-round ratios {d['per_round']}, median {d['median_of_ratios']}x, won {d['rounds_won']} of "
                  f"{d['rounds']} rounds", flush=True)
    if runner is not None:
        other_dtype = other_record["engine"].get("dtype", "the GGUF's own blocks")
        result.update({"compare": other, "dtypes": {"tessera": str(eng.dtype), other: other_dtype}})
        for key in ("prefill_tok_s", "decode_tok_s"):
            result.update(medians_and_ratio(runs, key, b=other))
        result[other] = other_record
        result["paired_vs_" + other] = paired_ratios(runs, other, "tessera")
        print(f"median decode tok/s: tessera {result['tessera_median_decode_tok_s']}, {other} "
              f"{result[f'{other}_median_decode_tok_s']} (tessera/{other} "
              f"{result[f'decode_tok_s_ratio_tessera_over_{other}']}x); prefill tok/s: tessera "
              f"{result['tessera_median_prefill_tok_s']}, {other} {result[f'{other}_median_prefill_tok_s']} "
              f"({result[f'prefill_tok_s_ratio_tessera_over_{other}']}x); {args.repeats} alternating rounds\n"
              f"{describe_cpu(result['cpu'])}", flush=True)
    return result
