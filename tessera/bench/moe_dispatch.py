"""`tessera bench moe-dispatch`: the engine's expert-parallel schemes side by side (EngineConfig.moe_dispatch:
allreduce, exflow, all-to-all), alternating round by round on the same workload; for each, the output
tokens per second and the bytes it moved between ranks per token and MoE layer (counted in the engine,
tessera.moe.token_flow.traffic_summary).

Two parallel engines cannot live in one process (one torch.distributed group), so every round loads each
scheme's engine afresh, runs the workload after a warm-up, and closes it; load time and warm-up are
neither timed nor counted.
Prompts: random token ids (nano-vllm's draw, `throughput.workload`), or with --essays the held-out essays
of a `tessera moe-train` checkpoint cut into --input-len LO token windows, so that the routing, and with
it the counted traffic, is the trained model's on text it was not fitted on."""

from __future__ import annotations

import json
import statistics
import time

SCHEMES = ("allreduce", "exflow", "all-to-all")


def add_moe_dispatch_args(sub) -> None:
    from tessera.config import add_engine_args

    p = sub.add_parser("moe-dispatch", help="expert-parallel schemes (allreduce / exflow / all-to-all) alternating: "
                       "output tok/s and counted bytes per token and MoE layer")
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, default=["allreduce", "exflow"])
    p.add_argument("--num-seqs", type=int, default=16)
    p.add_argument("--input-len", type=int, nargs=2, default=(64, 128), metavar=("LO", "HI"))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 32), metavar=("LO", "HI"))
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy, so every round routes the same")
    p.add_argument("--random-model", nargs="?", const="qwen3-moe", default=None,
                   help="build a random-weight model (default shape qwen3-moe)")
    p.add_argument("--essays", action="store_true", help="prompts from the held-out essays of the --model "
                   "checkpoint (`tessera moe-train`), windows of --input-len LO tokens")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs every scheme once")
    p.add_argument("--json-out", default=None)
    add_engine_args(p)


def essay_prompts(model_dir: str, num_seqs: int, length: int) -> list[list[int]]:
    """The first `num_seqs` windows of `length` tokens of the checkpoint's held-out essays (the windows
    its held-out trace and `tessera bench moe-placement --real-windows` use)."""
    from tessera.moe.train import chunks, load_split

    return chunks(load_split(model_dir).held_out, length)[:num_seqs].tolist()


def bench_moe_dispatch(args) -> dict:
    import random

    from tessera import LLM, SamplingParams
    from tessera.bench.compare import cpu_flags, describe_cpu
    from tessera.bench.random_model import build_random_model
    from tessera.bench.throughput import workload
    from tessera.config import engine_kwargs
    from tessera.errors import TesseraError

    kw = engine_kwargs(args)
    if kw.get("expert_parallel_size", 1) < 2:
        raise TesseraError("tessera bench moe-dispatch compares expert-parallel schemes: give --expert-parallel-size N")
    if args.random_model:
        kw["model"] = str(build_random_model(args.random_model))
    if args.essays:
        prompts = essay_prompts(kw["model"], args.num_seqs, args.input_len[0])
        rng = random.Random(0)
        out_lens = [rng.randint(*args.output_len) for _ in prompts]
    else:
        prompts, out_lens = workload(args.num_seqs, tuple(args.input_len), tuple(args.output_len))
    result = {"bench": "moe-dispatch", "model": kw["model"], "ranks": kw["expert_parallel_size"],
              "placement": kw.get("moe_placement"), "num_seqs": len(prompts),
              "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(out_lens), "essays": args.essays,
              "cpu": cpu_flags(), "runs": [], "traffic": {}}
    for rep in range(args.repeats):
        for scheme in args.schemes:  # alternate the schemes inside one run
            llm = LLM(**dict(kw, moe_dispatch=scheme))
            try:
                llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
                before = llm.moe_traffic()  # the warm-up's bytes are subtracted below
                t0 = time.perf_counter()
                outs = llm.generate(prompts, [SamplingParams(temperature=args.temperature, ignore_eos=True,
                                                             max_tokens=n) for n in out_lens], use_tqdm=False)
                elapsed = time.perf_counter() - t0
                assert [len(o.outputs[0].token_ids) for o in outs] == out_lens
                traffic = llm.moe_traffic()
            finally:
                llm.close()
            run = {"scheme": scheme, "round": rep, "elapsed_s": round(elapsed, 3),
                   "output_tok_s": round(sum(out_lens) / elapsed, 2)}
            result["runs"].append(run)
            result["traffic"].setdefault(scheme, _minus(traffic, before))
            print(json.dumps(run), flush=True)
    for scheme in args.schemes:
        result[f"{scheme}_median_output_tok_s"] = statistics.median(
            r["output_tok_s"] for r in result["runs"] if r["scheme"] == scheme)
    base = args.schemes[0]
    for scheme in args.schemes[1:]:
        result[f"ratio_{scheme}_vs_{base}"] = round(result[f"{scheme}_median_output_tok_s"]
                                                    / result[f"{base}_median_output_tok_s"], 3)
    for scheme, t in result["traffic"].items():
        print(f"{scheme}: bytes per token per MoE layer " + ", ".join(
            f"{k} {t[k]:.1f}" for k in ("dispatch", "combine", "kv", "reduce", "head", "meta", "total")))
    print("median output tok/s: " + ", ".join(f"{s} {result[f'{s}_median_output_tok_s']}" for s in args.schemes)
          + f" ({args.repeats} alternating rounds)\n{describe_cpu(result['cpu'])}", flush=True)
    return result


def _minus(after: dict, before: dict) -> dict:
    """The traffic of the timed run alone: totals after minus before, per token per MoE layer."""
    tokens = after["tokens"] - before["tokens"]
    per = max(tokens * after["moe_layers"], 1)
    out = {k: (after["bytes"][k] - before["bytes"][k]) / per for k in after["bytes"]}
    out["total"] = sum(out.values())
    out["tokens"] = tokens
    out["rows"] = (after["rows"] * after["tokens"] - before["rows"] * before["tokens"]) / max(tokens, 1)
    return out
