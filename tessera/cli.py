"""The `tessera` command: generate | run | serve | quantize | moe-train | moe-place | bench."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tessera.config import EngineConfig, add_engine_args, engine_kwargs
from tessera.config_args import add_config_args
from tessera.fleet.config import add_fleet_args
from tessera.longctx.config import add_long_context_args, long_context_config
from tessera.serve.config import add_server_args


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
    if args.instances > 1:  # a fleet: a router in front of N engine instances (tessera/fleet)
        from tessera.fleet.launch import serve_fleet

        return serve_fleet(args)
    return serve(args)


def cmd_quantize(args: argparse.Namespace) -> int:
    from tessera.models.default_model import default_model_gguf
    from tessera.quant.convert import quantize_checkpoint

    config = EngineConfig(**{name: getattr(args, name) for name in QUANTIZE_FIELDS})
    spec = config.quant_spec()
    if spec is None:
        print("tessera quantize: give --quantization (bits:N or gguf)", file=sys.stderr)
        return 2
    source = config.model or default_model_gguf()
    out = quantize_checkpoint(source, args.output, spec, lm_head=config.quantize_lm_head)
    print(f"wrote {out} (load it with --model {out})")
    return 0


QUANTIZE_FIELDS = ("model", "quantization", "quantization_group_size", "quantization_method", "quantize_lm_head")


def cmd_bench(args: argparse.Namespace) -> int:
    from tessera.bench import run_bench

    return run_bench(args)


def cmd_sim(args: argparse.Namespace) -> int:
    from tessera.fleet.sim_cli import run_sim

    return run_sim(args)


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
    add_server_args(p)
    add_fleet_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("quantize", help="write a quantized checkpoint (bit planes), loaded later without "
                       "quantizing again; streams a layer at a time")
    p.add_argument("--output", required=True, help="directory to write")
    add_config_args(p, EngineConfig, only=QUANTIZE_FIELDS)
    p.set_defaults(func=cmd_quantize)

    from tessera.moe.cli import add_moe_commands

    add_moe_commands(sub)
    p = sub.add_parser("sim", help="simulate a fleet of instances replaying a trace, per routing policy "
                       "(`tessera sim fit`: fit the step cost on this machine)")
    from tessera.fleet.sim_cli import add_sim_args

    add_sim_args(p)
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser("bench", help="benchmarks (JSON results)")
    from tessera.bench import add_bench_args

    add_bench_args(p)
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
