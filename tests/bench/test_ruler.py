"""`tessera bench ruler`: a small run, and --scores-dir, which keeps segment mode's stage-one scores so
that a sweep over the later settings skips stage one."""

from __future__ import annotations

import argparse

import pytest

from tessera.bench import add_bench_args
from tessera.bench.ruler import bench_ruler


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    return parser.parse_args(["ruler", "--lengths", "1600", "--depths", "0,50", "--tasks", "multikey",
                              "--splits", "dev", "--modes", "segments", "--max-model-len", "1024",
                              "--max-tokens", "8", "--scores-dir", str(tmp_path / "scores"), *extra])


def test_scores_dir_reuses_stage_one_only_where_it_applies(tmp_path, monkeypatch):
    import tessera.longctx.segments as segments

    first = bench_ruler(_args(tmp_path))
    saved = sorted((tmp_path / "scores").iterdir())
    assert len(saved) == 2  # one file per sample (depth)

    def no_stage_one(*a, **k):
        raise AssertionError("stage one ran although its scores were saved")

    monkeypatch.setattr(segments, "score_segments", no_stage_one)
    again = bench_ruler(_args(tmp_path, "--rerank", "8"))  # the later settings may differ: reused
    cells = [c["answer"] for c in first["modes"]["segments"]["dev"]["multikey"]["1600"]["cells"]]
    assert [c["answer"] for c in again["modes"]["segments"]["dev"]["multikey"]["1600"]["cells"]] == cells
    with pytest.raises(AssertionError, match="stage one ran"):  # another cut: scored anew
        bench_ruler(_args(tmp_path, "--segment-size", "96"))
    assert len(list((tmp_path / "scores").iterdir())) == 2


def test_scores_are_named_by_the_flags_that_differ_from_their_defaults(tmp_path):
    from types import SimpleNamespace

    import torch

    from tessera.bench.ruler import scores_path
    from tessera.longctx.config import segment_config
    from tessera.longctx.eval.tasks import Sample

    llm = SimpleNamespace(engine=SimpleNamespace(dtype=torch.bfloat16))
    sample = Sample("multikey", "dev", 1600, 50.0, "essays", "", "", ())

    def name(*extra):
        args = _args(tmp_path, *extra)
        return scores_path(args, llm, segment_config(args), sample).name

    base = name()
    assert name("--block-size", "16") == base  # a flag given at its default: the same scores
    assert name("--block-size", "32") != base and name("--max-model-len", "2048") != base
    assert name("--rerank", "4") == base  # acts after stage one
    assert name("--segment-size", "96") != base
