"""`tessera bench latency --compare-quantization`: several weight widths in one command, rounds interleaved
with a rotating order, each extra engine's per-round ratio to the first."""

from __future__ import annotations

import json

import pytest

from tessera.bench.latency import paired_ratios, parse_compare_quantization
from tessera.cli import main
from tessera.errors import InvalidRequestError


def test_paired_ratios_pair_runs_of_the_same_round():
    runs = [{"backend": "a", "round": 0, "decode_tok_s": 100.0}, {"backend": "b", "round": 0, "decode_tok_s": 120.0},
            {"backend": "b", "round": 1, "decode_tok_s": 60.0}, {"backend": "a", "round": 1, "decode_tok_s": 50.0},
            {"backend": "a", "round": 2, "decode_tok_s": 110.0}, {"backend": "b", "round": 2, "decode_tok_s": 99.0}]
    r = paired_ratios(runs, "a", "b")
    assert r["per_round"] == [1.2, 1.2, 0.9]
    assert r["median_of_ratios"] == 1.2 and r["rounds_won"] == 2 and r["rounds"] == 3
    # medians 99 / 100: a slow round on both sides moves the ratio of medians, not the paired ratios
    assert r["ratio_of_medians"] == 0.99


def test_parse_compare_quantization():
    assert parse_compare_quantization(None) == []
    assert parse_compare_quantization("bits:3, bits:2,none") == ["bits:3", "bits:2", None]
    with pytest.raises(InvalidRequestError, match="empty entry"):
        parse_compare_quantization("bits:3,,bits:2")


def test_latency_rotates_the_widths_in_each_round(model_dir, tmp_path):
    out = tmp_path / "r.json"
    code = main(["bench", "latency", "--model", str(model_dir("llama")), "--dtype", "float32", "--prompt-len", "6",
                 "--output-len", "4", "--repeats", "4", "--quantization", "bits:4",
                 "--compare-quantization", "bits:2,none", "--json-out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    names = ["tessera", "tessera:bits:2", "tessera:none"]
    want = [(names[(r + i) % 3], r) for r in range(4) for i in range(3)]  # 4 2 n, 2 n 4, n 4 2, 4 2 n
    assert [(r["backend"], r["round"]) for r in res["runs"]] == want
    assert set(res["widths"]) == {"tessera:bits:2", "tessera:none"}
    for w in res["widths"].values():
        d = w["decode_tok_s"]
        assert d["rounds"] == 4 and len(d["per_round"]) == 4 and 0 <= d["rounds_won"] <= 4
    assert res["quantization"] == "bits:4"
