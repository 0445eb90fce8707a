"""`tessera bench needle`: the haystack places the needle where asked, answers are judged as the task
says, and a small end-to-end run of all three modes writes its table and heat map."""

from __future__ import annotations

import argparse

import pytest

from tessera.bench import add_bench_args
from tessera.bench.needle import NEEDLE, bench_needle, essays_text, haystack_with_needle, is_correct


@pytest.fixture(scope="module")
def tok():
    from tessera.models.default_model import default_model_dir
    from tessera.tokenizer import load_tokenizer

    return load_tokenizer(default_model_dir(progress=False))


def test_needle_placed_at_depth_on_a_sentence_boundary(tok):
    hay = tok.encode(essays_text()[:60000], add_special_tokens=False)
    assert len(hay) > 10000
    for depth in (0, 30, 100):
        text = haystack_with_needle(tok, hay, 4000, depth)
        at = text.index(NEEDLE)
        before = text[:at].rstrip()
        assert text.count(NEEDLE) == 1
        assert before == "" or before.endswith(".")
        n_before = len(tok.encode(text[:at], add_special_tokens=False))
        assert abs(n_before - 4000 * depth / 100) < 200  # backed off to the sentence start only
        assert abs(len(tok.encode(text, add_special_tokens=False)) - 4000) < 20


def test_answers_are_judged_by_the_sandwich_or_dolores_park():
    assert is_correct("Eat a Sandwich in the park.") and is_correct("sit in Dolores Park")
    assert not is_correct("Start a startup.") and not is_correct("")


def test_small_run_of_all_modes_writes_table_and_heatmap(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    png = tmp_path / "needle.png"
    args = parser.parse_args(["needle", "--lengths", "400,1600", "--depths", "0,100", "--max-model-len", "1024",
                              "--segment-size", "256", "--segment-overlap", "16", "--max-tokens", "8",
                              "--sparse-top-k", "64", "--speed-lengths", "600", "--speed-tokens", "4",
                              "--speed-repeats", "1", "--png", str(png)])
    result = bench_needle(args)
    modes = result["modes"]
    assert set(modes) == {"plain", "segments", "sparse"}
    assert set(modes["plain"]) == set(modes["segments"]) == {"400", "1600"}
    assert set(modes["sparse"]) == {"400"}  # 1,600 tokens do not fit the 1,024-token window
    cell = modes["segments"]["1600"]["cells"][0]
    assert cell["num_segments"] >= 6 and 1 <= cell["needle_rank"] <= cell["num_segments"]
    # one segment in the key context (SegmentConfig().top_k); whether it holds the needle is reported
    assert len(cell["selected_segments"]) == 1 and isinstance(cell["needle_selected"], bool)
    assert 0 <= modes["sparse"]["400"]["retrieval"]["recall"] <= 1
    assert result["decode_speed"][0]["median_decode_tok_s"]["sparse"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "segments: accuracy by context length" in capsys.readouterr().out
