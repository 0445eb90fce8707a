"""10,000 short requests through `tessera run`'s runner: every output present, memory flat."""

from __future__ import annotations

import json
import random

import pytest

from tessera import LLM
from tessera.batch_runner import run_file


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def write_requests(path, n, seed):
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            ids = [rng.randint(3, 500) for _ in range(rng.randint(4, 24))]
            f.write(json.dumps({"prompt_token_ids": ids, "max_tokens": rng.randint(1, 8), "temperature": 0.7,
                                "ignore_eos": True, "id": i}) + "\n")


@pytest.mark.slow
def test_ten_thousand_requests_complete_with_flat_memory(tmp_path, model_dir):
    llm = LLM(str(model_dir("llama")), progress=False, max_num_seqs=128)
    warm_in, warm_out = tmp_path / "warm.jsonl", tmp_path / "warm.out.jsonl"
    write_requests(warm_in, 2000, seed=0)
    run_file(llm, warm_in, warm_out, {}, window=512, progress=False)
    before = rss_mb()
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_requests(inp, 10_000, seed=1)
    stats = run_file(llm, inp, out, {}, window=512, progress=False)
    after = rss_mb()
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["errors"] == 0 and len(recs) == 10_000
    assert [r["index"] for r in recs] == list(range(10_000)) and [r["id"] for r in recs] == list(range(10_000))
    assert all(r["finish_reason"] == "length" and len(r["token_ids"]) >= 1 for r in recs)
    assert not llm.engine.has_unfinished_requests() and llm.engine.block_manager.num_used_blocks == 0
    # 5x the requests of the warm-up run must not grow the process: allow allocator noise only.
    assert after - before < 48, f"RSS grew {after - before:.1f} MB over 10,000 requests"
