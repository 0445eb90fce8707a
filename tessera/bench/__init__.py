"""`tessera bench <name>`: fixed workloads, JSON results (see docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from tessera.config import add_engine_args


def add_bench_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True)
    t = sub.add_parser("throughput", help="nano-vllm's offline throughput bench")
    t.add_argument("--num-seqs", type=int, default=None, help="default 64 on CPU, 256 on GPU")
    t.add_argument("--input-len", type=int, nargs=2, default=None, metavar=("LO", "HI"))
    t.add_argument("--output-len", type=int, nargs=2, default=None, metavar=("LO", "HI"))
    t.add_argument("--temperature", type=float, default=0.6)
    t.add_argument("--random-model", nargs="?", const="reference", default=None,
                   help="build a random-weight model: 'reference' (DESIGN.md), 'qwen3-0.6b' or 'qwen3-moe'")
    t.add_argument("--backend", choices=["tessera", "hf"], default="tessera",
                   help="hf: also run transformers' continuous batching, alternating with tessera "
                        "(the same as --compare hf)")
    t.add_argument("--repeats", type=int, default=None, help="rounds (default 1; 3 with --compare)")
    t.add_argument("--profile", action="store_true", help="add a per-step time breakdown")
    t.add_argument("--compare-quantization", default=None, metavar="Q",
                   help="also run a second tessera engine, the same but with --quantization Q ('none': "
                        "full-width weights; a '+a8' or '+exact' suffix sets --activation-bits 8 or unset), "
                        "alternating round by round with the first (3 rounds)")
    t.add_argument("--json-out", default=None)
    add_engine_args(t)
    from tessera.bench.compare import add_compare_args

    add_compare_args(t, ("hf", "vllm"))

    lat = sub.add_parser("latency", help="load time, single-sequence prefill and decode tok/s")
    lat.add_argument("--prompt-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--repeats", type=int, default=3)
    lat.add_argument("--compare-quantization", default=None, metavar="Q[,Q...]",
                     help="also run tessera engines that differ only in --quantization (e.g. bits:3,bits:2; "
                          "'none': full-width weights; a '+a8' or '+exact' suffix sets --activation-bits 8 or "
                          "unset, else the first engine's), in the same rounds, the order rotating each round; "
                          "reports each one's per-round ratio to the first engine")
    lat.add_argument("--json-out", default=None)
    add_engine_args(lat)
    add_compare_args(lat, ("vllm", "llama.cpp"))
    lat.add_argument("--llamacpp-python", default=None,
                     help="python of the llama-cpp-python environment (default $TESSERA_LLAMACPP_PYTHON, else "
                          ".venv-llamacpp/bin/python; `make llamacpp-venv`)")

    from tessera.bench.prefix import add_prefix_args  # bench prefix

    add_prefix_args(sub)

    from tessera.bench.serve import add_serve_bench_args

    add_serve_bench_args(sub)

    from tessera.bench.needle import add_needle_args

    add_needle_args(sub)

    from tessera.bench.ruler import add_ruler_args

    add_ruler_args(sub)

    from tessera.bench.perplexity import add_perplexity_args

    add_perplexity_args(sub)

    from tessera.bench.bits_gpu import add_bits_gpu_args

    add_bits_gpu_args(sub)
    from tessera.bench.lora import add_lora_bench_args

    add_lora_bench_args(sub)
    from tessera.bench.offload import add_offload_args

    add_offload_args(sub)
    from tessera.bench.ring import add_ring_args

    add_ring_args(sub)
    from tessera.bench.moe_placement import add_moe_placement_args

    add_moe_placement_args(sub)
    from tessera.bench.moe_dispatch import add_moe_dispatch_args

    add_moe_dispatch_args(sub)
    from tessera.bench.fleet import add_fleet_bench_args

    add_fleet_bench_args(sub)
    from tessera.bench.blockllm import add_blockllm_bench_args

    add_blockllm_bench_args(sub)


# Each bench's runner, imported only when that bench runs (some pull in heavy optional packages).
RUNNERS: dict[str, str] = {
    "throughput": "tessera.bench.throughput:bench_throughput",
    "latency": "tessera.bench.latency:bench_latency",
    "serve": "tessera.bench.serve:bench_serve",
    "prefix": "tessera.bench.prefix:bench_prefix",
    "needle": "tessera.bench.needle:bench_needle",
    "ruler": "tessera.bench.ruler:bench_ruler",
    "lora": "tessera.bench.lora:bench_lora",
    "perplexity": "tessera.bench.perplexity:bench_perplexity",
    "bits-gpu": "tessera.bench.bits_gpu:run_bits_gpu",
    "blockllm": "tessera.bench.blockllm:bench_blockllm",
    "offload": "tessera.bench.offload:bench_offload",
    "ring": "tessera.bench.ring:bench_ring",
    "moe-placement": "tessera.bench.moe_placement:bench_moe_placement",
    "moe-dispatch": "tessera.bench.moe_dispatch:bench_moe_dispatch",
    "fleet": "tessera.bench.fleet:bench_fleet",
}


def run_bench(args: argparse.Namespace) -> int:
    target = RUNNERS.get(args.bench)
    if target is None:
        print(f"unknown bench {args.bench}", file=sys.stderr)
        return 2
    module_name, function_name = target.split(":")
    result = getattr(importlib.import_module(module_name), function_name)(args)
    text = json.dumps(result, indent=2)
    print(text)
    if getattr(args, "json_out", None):
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    return 0
