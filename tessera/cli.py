"""The `tessera` command: generate | run | serve | bench."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--kv-cache-memory", type=float, default=None,
                   help="KV cache size in bytes, or a fraction (<= 1) of free memory")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--no-prefix-caching", action="store_true", help="turn the automatic prefix cache off")
    g.add_argument("--prefix-planning", choices=["auto", "on", "off"], default="auto",
                   help="offline batches: plan shared prefixes globally (auto: when prefix caching is on)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-threads", type=int, default=None)


def engine_kwargs(args: argparse.Namespace) -> dict:
    kv = args.kv_cache_memory
    return dict(model=args.model, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                kv_cache_memory=int(kv) if kv is not None and kv > 1 else kv, block_size=args.block_size,
                enable_prefix_caching=not args.no_prefix_caching, prefix_planning=args.prefix_planning,
                max_model_len=args.max_model_len,
                seed=args.seed, num_threads=args.num_threads)


def add_long_context_args(p: argparse.ArgumentParser, choose_mode: bool = True) -> None:
    """The knobs of both long-context modes; `--long-context` picks one (callers that run both, like
    `tessera bench needle`, leave it out)."""
    g = p.add_argument_group("long context")
    if choose_mode:
        g.add_argument("--long-context", choices=["segments", "sparse"], default=None,
                       help="segments: XL3M segment-wise inference past the window; sparse: sparse KV retrieval")
    g.add_argument("--segment-size", type=int, default=2048)
    g.add_argument("--segment-overlap", type=int, default=128)
    g.add_argument("--question-tokens", type=int, default=64, help="the input's last tokens taken as the question")
    g.add_argument("--question", default=None, help="an explicit question the input ends with")
    g.add_argument("--top-k-segments", type=int, default=2, help="segments in the key context (0: as many as fit)")
    g.add_argument("--score-positions", type=int, default=2,
                   help="score a segment by its N most certain question positions (0: all of them)")
    g.add_argument("--rerank", type=int, default=8,
                   help="segments answered alone and reordered by the answer's certainty (0: off)")
    g.add_argument("--snap-tokens", type=int, default=0,
                   help="widen an answering segment to whole sentences by at most N tokens each way (0: off)")
    g.add_argument("--lead-segment", action=argparse.BooleanOptionalAction, default=False,
                   help="start the cut a segment overlap before the input (with overlap = size/2, every "
                        "token lies in some segment's second half)")
    g.add_argument("--sparse-top-k", type=int, default=1024)
    g.add_argument("--sparse-sinks", type=int, default=4)
    g.add_argument("--sparse-recent", type=int, default=64)
    g.add_argument("--retrieval-layers", type=int, default=2)
    g.add_argument("--sparse-observed", type=int, default=512,
                   help="of the sparse top-k, positions fixed by observing the prompt's end (0: none)")
    g.add_argument("--sparse-offload", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the full KV in a host store and fetch from it (default: on a GPU only)")


def segment_config(args: argparse.Namespace):
    from tessera.longctx import SegmentConfig

    return SegmentConfig(segment_size=args.segment_size, overlap=args.segment_overlap,
                         question_tokens=args.question_tokens, question=args.question,
                         top_k=args.top_k_segments or None, score_positions=args.score_positions or None,
                         rerank=args.rerank, snap_tokens=args.snap_tokens,
                         lead=args.lead_segment)


def sparse_config(args: argparse.Namespace, measure_recall: bool = False):
    from tessera.longctx import SparseConfig

    return SparseConfig(top_k=args.sparse_top_k, sink_tokens=args.sparse_sinks, recent_tokens=args.sparse_recent,
                        retrieval_layers=args.retrieval_layers, observed_tokens=args.sparse_observed,
                        offload=args.sparse_offload, measure_recall=measure_recall)


def long_context_config(args: argparse.Namespace):
    if args.long_context == "segments":
        return segment_config(args)
    if args.long_context == "sparse":
        return sparse_config(args)
    return None


def cmd_generate(args: argparse.Namespace) -> int:
    from tessera import LLM, SamplingParams
    from tessera.tokenizer import apply_chat_template

    if (args.prompt is None) == (args.prompt_file is None):
        print("tessera generate: give a prompt or --prompt-file (one of them)", file=sys.stderr)
        return 2
    text = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text(encoding="utf-8")
    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sample_seed)
    long_context = long_context_config(args)
    if long_context is not None:  # runs as a batch of its own (segments are scored first): printed at the end
        if args.chat:
            out = llm.chat([{"role": "user", "content": text}], params, use_tqdm=False, long_context=long_context)
        else:
            out = llm.generate(text, params, use_tqdm=False, long_context=long_context)
        print(out[0].text)
        return 0
    eng = llm.engine
    prompt = apply_chat_template(eng.tokenizer, [{"role": "user", "content": text}]) if args.chat else text
    rid = eng.add_request(prompt, params, stream=True)
    printed = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id == rid:
                sys.stdout.write(out.text[printed:])
                sys.stdout.flush()
                printed = len(out.text)
    sys.stdout.write("\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tessera.batch_runner import run_jsonl

    return run_jsonl(args)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from tessera.serve.launch import serve
    except ImportError as e:
        print(f"tessera serve needs the server extras: pip install 'tessera-llm[serve]' ({e})", file=sys.stderr)
        return 1
    return serve(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from tessera.bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description="tessera LLM inference engine")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="stream one completion to the terminal")
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file (long inputs)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--sample-seed", type=int, default=None, help="seed of this request's sampling")
    add_long_context_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("run", help="offline batch: one JSON output line per input line, in order")
    p.add_argument("--input", required=True, help="JSONL: {prompt | messages | prompt_token_ids, ...sampling}")
    p.add_argument("--output", required=True)
    p.add_argument("--max-tokens", type=int, default=None, help="default max_tokens for lines that give none")
    p.add_argument("--temperature", type=float, default=None, help="default temperature")
    p.add_argument("--window", type=int, default=None,
                   help="requests kept in flight at once (default 4 x max-num-seqs); bounds memory")
    add_long_context_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-waiting", type=int, default=1024, help="waiting-queue bound (429 past it)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds to finish in-flight on SIGTERM")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="benchmarks (JSON results)")
    from tessera.bench import add_bench_args

    add_bench_args(p, add_engine_args)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from tessera.errors import TesseraError

    try:
        return args.func(args) or 0
    except TesseraError as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
