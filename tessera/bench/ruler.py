"""`tessera bench ruler`: the RULER-style task set of tessera.longctx.eval, development and held-out,
through three modes, each with the library's defaults unless flags say otherwise:

  plain     the chat prompt truncated to the window, keeping the end (in the window: the model itself)
  segments  XL3M segment-wise inference, `SegmentConfig()` (tessera.longctx.segments)
  sparse    sparse KV retrieval while decoding, `SparseConfig()`, for inputs inside the window only

A cell is (mode, split, task, length): one sample per depth, run as one batch, scored exactly
(tessera.longctx.eval.scoring). Choose settings on `--splits dev` only; the held-out split is for
reporting."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

MODES = ("plain", "segments", "sparse")


def truncated_prompt(tok, conv: list[dict], window: int, max_tokens: int) -> tuple[list[int], bool]:
    """The chat prompt of `conv`, its last user message cut from the front (the question, its last
    paragraph, kept) to fit the window with `max_tokens` to spare; and whether anything was cut."""
    from tessera.longctx import SegmentConfig
    from tessera.longctx.segments import from_chat

    lp = from_chat(tok, conv, SegmentConfig(question=conv[-1]["content"].rpartition("\n\n")[2]))
    room = window - max_tokens - len(lp.head) - len(lp.question)
    return lp.head + lp.body[max(len(lp.body) - room, 0):] + lp.question, len(lp.body) > room


# What stage one's segment scores depend on: the cut, the score and the question (rerank, top_k and
# snapping act on them afterwards, so a sweep over those reuses them).
STAGE_ONE_FIELDS = ("segment_size", "overlap", "lead", "question_tokens", "question", "score", "score_from",
                    "score_positions")


def scores_path(args, llm, cfg, sample) -> Path:
    """Where `--scores-dir` keeps one sample's stage-one scores: named by everything they depend on (every
    engine flag set to other than its default, to be safe: the model, its dtype and quantization among
    them; a flag added later, at its default, leaves the names as they were)."""
    from tessera.config import EngineConfig, engine_kwargs

    defaults = EngineConfig()
    engine = sorted((k, str(v)) for k, v in engine_kwargs(args).items() if v != getattr(defaults, k))
    key = json.dumps([engine, str(llm.engine.dtype), sample.task, sample.split, sample.length,
                      sample.depth, [getattr(cfg, f) for f in STAGE_ONE_FIELDS]])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(args.scores_dir) / f"{sample.task}-{sample.split}-{sample.length}-{sample.depth:g}-{digest}.json"


def run_segments(llm, samples: list, params, args) -> list:
    """Segment mode on `samples`; with --scores-dir, stage one's scores are read from there when a run
    with the same model, cut and score saved them, and saved otherwise."""
    from tessera.longctx.config import segment_config
    from tessera.longctx.segments import from_chat, generate_segments

    cfg = segment_config(args)
    convs = [s.conversation() for s in samples]
    if not args.scores_dir:
        return llm.chat(convs, params, use_tqdm=False, long_context=cfg)
    paths = [scores_path(args, llm, cfg, s) for s in samples]
    if all(p.exists() for p in paths):
        scores = [json.loads(p.read_text()) for p in paths]
    else:
        scores = None
    prompts = [from_chat(llm.get_tokenizer(), c, cfg) for c in convs]
    outs = generate_segments(llm, prompts, [params] * len(prompts), cfg, False, scores=scores)
    if scores is None:
        Path(args.scores_dir).mkdir(parents=True, exist_ok=True)
        for p, out in zip(paths, outs, strict=True):
            p.write_text(json.dumps(out.metrics["segment_entropies"]))
    return outs


def run_cell(llm, mode: str, samples: list, params, args) -> list | None:
    """The outputs of `samples` in `mode` (None: the mode does not run at this length)."""
    from tessera.longctx.config import sparse_config

    convs = [s.conversation() for s in samples]
    if mode == "segments":
        return run_segments(llm, samples, params, args)
    tok = llm.get_tokenizer()
    window = llm.engine.max_model_len
    prompts, cut = zip(*(truncated_prompt(tok, c, window, params.max_tokens) for c in convs), strict=True)
    if mode == "plain":
        return llm.generate(list(prompts), params, use_tqdm=False)
    if any(cut):
        return None  # sparse retrieval works inside the window only
    return llm.generate(list(prompts), params, use_tqdm=False, long_context=sparse_config(args))


def bench_ruler(args) -> dict:
    from tessera import LLM, SamplingParams
    from tessera.config import engine_kwargs
    from tessera.longctx.eval.haystacks import Haystacks
    from tessera.longctx.eval.scoring import score
    from tessera.longctx.eval.tasks import DEPTHS, build_samples

    llm = LLM(**engine_kwargs(args))
    tok = llm.get_tokenizer()
    hay = Haystacks(tok)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = tuple(float(x) for x in args.depths.split(",")) if args.depths else DEPTHS
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    result: dict = {"model": args.model or "SmolLM2-135M-Instruct", "window": llm.engine.max_model_len,
                    "lengths": lengths, "depths": list(depths), "tasks": args.tasks, "splits": args.splits,
                    "modes": {}}
    for mode in args.modes:
        table: dict = {}
        for split in args.splits:
            for length in lengths:
                for task in args.tasks:
                    samples = build_samples(hay, task, split, length, depths)
                    t0 = time.perf_counter()
                    outs = run_cell(llm, mode, samples, params, args)
                    if outs is None:
                        continue
                    cells = [{"depth": s.depth, "haystack": s.haystack, "score": score(o.text, s.answers),
                              "answers": list(s.answers), "answer": o.text.strip()[:160]}
                             for s, o in zip(samples, outs, strict=True)]
                    acc = sum(c["score"] for c in cells) / len(cells)
                    table.setdefault(split, {}).setdefault(task, {})[str(length)] = {
                        "accuracy": round(acc, 3), "elapsed_s": round(time.perf_counter() - t0, 1), "cells": cells}
                    print(f"{mode:9s} {split:8s} {task:11s} {length:>7d}: "
                          + " ".join(f"{c['score']:.1f}"[-3:] if 0 < c["score"] < 1 else "#."[c["score"] == 0]
                                     for c in cells)
                          + f"  {acc:.0%}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        result["modes"][mode] = table
    print(format_table(result))
    return result


def format_table(result: dict) -> str:
    """Per mode and split: accuracy (%) by task (rows) and length (columns), with the mean over tasks."""
    lines = []
    for mode, table in result["modes"].items():
        for split, tasks in table.items():
            lengths = [str(n) for n in result["lengths"] if any(str(n) in row for row in tasks.values())]
            lines.append(f"\n{mode} / {split}: accuracy % by task and length ({len(result['depths'])} depths)")
            lines.append(f"{'task':>11} " + " ".join(f"{int(n) // 1024:>5}K" for n in lengths))
            for task, row in tasks.items():
                lines.append(f"{task:>11} " + " ".join(f"{100 * row[n]['accuracy']:>6.0f}" if n in row else
                                                       f"{'-':>6}" for n in lengths))
            means = []
            for n in lengths:
                accs = [row[n]["accuracy"] for row in tasks.values() if n in row]
                means.append(f"{100 * sum(accs) / len(accs):>6.0f}")
            lines.append(f"{'mean':>11} " + " ".join(means))
    return "\n".join(lines)


def add_ruler_args(sub) -> None:
    from tessera.config import add_engine_args
    from tessera.longctx.config import add_long_context_args
    from tessera.longctx.eval.tasks import LENGTHS, SPLITS, TASKS

    p = sub.add_parser("ruler", help="RULER-style long-context tasks, dev and held-out: plain / segments / sparse")
    p.add_argument("--lengths", default=",".join(str(n) for n in LENGTHS),
                   help="haystack lengths in tokens, comma-separated")
    p.add_argument("--depths", default="", help="depths in percent, comma-separated (default: ten, 0 to 100)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS,
                   help="dev: the set to choose settings on; heldout: for reporting only")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--scores-dir", default=None,
                   help="keep segment mode's stage-one scores here, per sample, and reuse them in later runs "
                        "with the same model, cut and score (a sweep over --rerank or --top-k-segments then "
                        "skips stage one, nearly all of the time)")
    add_long_context_args(p, choose_mode=False)
    p.add_argument("--json-out", default=None)
    add_engine_args(p)
