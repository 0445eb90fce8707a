"""Engine and long-context flags are generated from their config dataclasses: every field is a flag of
every command that runs an engine, and parsing a config's flags gives that config back."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from tessera import LLM
from tessera.cli import build_parser
from tessera.config import EngineConfig
from tessera.config_args import cli_fields, config_argv
from tessera.longctx.config import SegmentConfig, SparseConfig, long_context_config, segment_config, sparse_config

NOT_FLAGS = {"extra"}  # EngineConfig fields that are not on the command line
ENGINE_COMMANDS = [("generate",), ("run",), ("serve",), ("bench", "throughput"), ("bench", "latency"),
                   ("bench", "prefix"), ("bench", "serve"), ("bench", "needle"),
                   ("bench", "offload")]
REQUIRED = {("run",): ["--input", "in.jsonl", "--output", "out.jsonl"]}


def subparser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    p = build_parser()
    for name in path:
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        p = sub.choices[name]
    return p


def parse(path: tuple[str, ...], argv: list[str]) -> argparse.Namespace:
    return subparser(path).parse_args([*REQUIRED.get(path, []), *argv])


def test_every_engine_field_is_a_flag_with_help():
    flagged = {c.field.name for c in cli_fields(EngineConfig)}
    assert flagged == {f.name for f in dataclasses.fields(EngineConfig)} - NOT_FLAGS
    llm_params = inspect.signature(LLM).parameters
    assert flagged <= set(llm_params), "LLM(**engine_kwargs(args)) needs every engine flag as a keyword"


@pytest.mark.parametrize("path", ENGINE_COMMANDS, ids=" ".join)
def test_engine_flags_on_every_command_round_trip(path):
    options = {s for a in subparser(path)._actions for s in a.option_strings}
    for c in cli_fields(EngineConfig):
        assert set(c.flags) <= options, (path, c.field.name)
    assert EngineConfig.from_cli_args(parse(path, [])) == EngineConfig()  # the defaults are the dataclass's
    for cfg in (EngineConfig(model="/m", dtype="bfloat16", device="cpu", max_num_seqs=3, max_num_batched_tokens=77,
                             kv_cache_memory=123456789, block_size=32, enable_prefix_caching=False,
                             prefix_planning="on", max_model_len=512, seed=7, num_threads=2, enable_lora=True,
                             max_loras=2, max_lora_rank=8, max_cpu_loras=6),
                EngineConfig(kv_cache_memory=0.25, enable_prefix_caching=True, prefix_planning="off")):
        assert EngineConfig.from_cli_args(parse(path, config_argv(cfg))) == cfg


def test_engine_flag_spellings_kept():
    args = parse(("serve",), ["--no-prefix-caching", "--kv-cache-memory", "2e9", "--dtype", "auto"])
    cfg = EngineConfig.from_cli_args(args)
    assert cfg.enable_prefix_caching is False and cfg.kv_cache_memory == 2_000_000_000
    assert isinstance(cfg.kv_cache_memory, int) and cfg.dtype == "auto"
    assert EngineConfig.from_cli_args(parse(("serve",), ["--kv-cache-memory", "0.5"])).kv_cache_memory == 0.5
    assert parse(("serve",), ["--prefix-caching"]).enable_prefix_caching is True
    lora = EngineConfig.from_cli_args(parse(("serve",), ["--enable-lora", "--max-loras", "8", "--max-lora-rank", "32"]))
    assert (lora.enable_lora, lora.max_loras, lora.max_lora_rank, lora.max_cpu_loras) == (True, 8, 32, None)


@pytest.mark.parametrize("path", [("generate",), ("run",)], ids=" ".join)
def test_long_context_flags_round_trip(path):
    assert long_context_config(parse(path, [])) is None
    assert long_context_config(parse(path, ["--long-context", "segments"])) == SegmentConfig()
    assert long_context_config(parse(path, ["--long-context", "sparse"])) == SparseConfig()
    seg = SegmentConfig(segment_size=512, overlap=256, lead=True, question_tokens=9, question="Why?", top_k=None,
                        score_positions=None, rerank=0, snap_tokens=32)
    sparse = SparseConfig(top_k=64, sink_tokens=1, recent_tokens=8, retrieval_layers=1, observed_tokens=0,
                          offload=False)
    for cfg, mode in ((seg, "segments"), (sparse, "sparse")):
        assert long_context_config(parse(path, ["--long-context", mode, *config_argv(cfg)])) == cfg
    # the historical spellings
    args = parse(path, ["--long-context", "segments", "--segment-overlap", "16", "--top-k-segments", "0",
                        "--no-lead-segment", "--sparse-top-k", "32", "--sparse-offload"])
    assert long_context_config(args) == SegmentConfig(overlap=16, top_k=None, lead=False)
    args.long_context = "sparse"
    assert long_context_config(args) == SparseConfig(top_k=32, offload=True)


def test_long_context_benches_run_the_library_defaults():
    for bench in ("needle", "ruler"):
        args = parse(("bench", bench), [])
        assert segment_config(args) == SegmentConfig() and sparse_config(args) == SparseConfig()
