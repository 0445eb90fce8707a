"""`tessera bench serve`'s pieces that need no server: the truncated-JSON parse, vLLM's ShareGPT
filter, the metric arithmetic and the launched server's arguments. (The load itself runs against a
real server in tests/serve/test_server.py.)"""

from __future__ import annotations

import json

import pytest

from tessera.bench.serve import (
    RequestResult,
    engine_argv,
    parse_json_array_prefix,
    sample_random,
    sample_sharegpt,
    summarize,
)
from tessera.cli import build_parser


def test_parse_stops_at_the_cut_off_record():
    records = [{"id": str(i), "conversations": [{"from": "human", "value": "a, b ]"}]} for i in range(3)]
    text = json.dumps(records, indent=2)
    assert parse_json_array_prefix(text) == records
    cut = text[: text.rindex('"id"') + 8]  # inside the third record
    assert parse_json_array_prefix(cut) == records[:2]
    assert parse_json_array_prefix("[]") == []


class WordTokenizer:
    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]


def test_sharegpt_filter_and_seeded_order():
    w = lambda n: " ".join(["x"] * n)  # noqa: E731
    pairs = [
        (w(10), w(20)),
        (w(3), w(20)),
        (w(10), w(3)),
        (w(1100), w(10)),
        (w(1000), w(1049)),
        (w(1000), w(1048)),
        (w(4), w(4)),
    ]
    got = sample_sharegpt(pairs, WordTokenizer(), 3, seed=0)
    assert sorted((r.prompt_len, r.output_len) for r in got) == [(4, 4), (10, 20), (1000, 1048)]
    assert [r.prompt for r in got] == [r.prompt for r in sample_sharegpt(pairs, WordTokenizer(), 3, seed=0)]
    assert all(r.output_len == 7 for r in sample_sharegpt(pairs, WordTokenizer(), 3, fixed_output_len=7))
    with pytest.raises(ValueError, match="only 3 usable"):
        sample_sharegpt(pairs, WordTokenizer(), 4)


def test_random_prompts_have_exact_lengths():
    reqs = sample_random(5, 30, 8, 0.5, vocab_size=1000, seed=3)
    assert all(15 <= r.prompt_len <= 45 and len(r.prompt) == r.prompt_len and 4 <= r.output_len <= 12 for r in reqs)
    assert all(0 <= t < 1000 for r in reqs for t in r.prompt)
    assert [r.prompt for r in reqs] == [r.prompt for r in sample_random(5, 30, 8, 0.5, 1000, seed=3)]


def test_summary_follows_vllm_definitions():
    ok = RequestResult(True, prompt_len=10, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1, 0.1, 0.1, 0.1])
    one = RequestResult(True, prompt_len=6, output_tokens=1, ttft=0.2, latency=0.2)
    bad = RequestResult(False, prompt_len=99, error="HTTP 429: full")
    out = summarize([ok, one, bad], duration=2.0)
    assert (out["completed"], out["failed"]) == (2, 1)
    assert out["total_input_tokens"] == 16 and out["total_output_tokens"] == 6
    assert out["request_throughput"] == 1.0 and out["output_throughput"] == 3.0
    assert out["total_token_throughput"] == 11.0
    assert out["mean_tpot_ms"] == pytest.approx(100.0)  # (0.5 - 0.1) / (5 - 1); one-token requests excluded
    assert out["median_ttft_ms"] == pytest.approx(150.0)
    assert out["mean_itl_ms"] == pytest.approx(100.0)
    assert out["errors"] == ["HTTP 429: full"]


def test_launch_passes_engine_options():
    args = build_parser().parse_args(
        [
            "bench",
            "serve",
            "--launch",
            "--max-model-len",
            "2048",
            "--kv-cache-memory",
            "1e9",
            "--no-prefix-caching",
            "--request-rate",
            "2",
        ]
    )
    argv = engine_argv(args)
    assert argv[argv.index("--max-model-len") + 1] == "2048"
    assert argv[argv.index("--kv-cache-memory") + 1] == "1000000000"
    assert "--no-enable-prefix-caching" in argv and "--model" not in argv
    assert build_parser().parse_args(["serve", *argv]).enable_prefix_caching is False
    assert args.request_rate == 2.0 and args.dataset == "sharegpt"
