"""`tessera moe-place` (and, slow, `tessera moe-train` end to end on a tiny shape)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from moe_traces import markov_trace

from tessera.cli import main
from tessera.moe.placement import Placement
from tessera.moe.trace import RoutingTrace


def test_moe_place_writes_a_loadable_placement(tmp_path, capsys):
    path = markov_trace(4, 8, 2, seqs=8, seq_len=32, seed=3).save(tmp_path / "trace.npz")
    out = tmp_path / "placement.json"
    assert main(["moe-place", "--trace", str(path), "--ranks", "4", "--output", str(out), "--time-limit", "5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    p = Placement.load(out)
    assert p.rank_of.shape == (4, 8) and p.num_ranks == 4 and p.max_load() == 2
    assert summary["pair_cut"] <= summary["pair_cut_round_robin"]
    moves = summary["moves_per_token_layer_on_this_trace"]
    assert moves[f"{p.method} exflow"] < moves["round-robin two-a2a"]


def test_moe_place_bad_inputs_are_clear_errors(tmp_path, capsys):
    path = markov_trace(2, 8, 2, seqs=2, seq_len=8, seed=0).save(tmp_path / "trace.npz")
    assert main(["moe-place", "--trace", str(path), "--ranks", "2", "--capacity", "3",
                 "--output", str(tmp_path / "p.json")]) == 2
    assert "do not fit" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"not a trace")
    assert main(["moe-place", "--trace", str(tmp_path / "junk.npz"), "--ranks", "2",
                 "--output", str(tmp_path / "p.json")]) == 2
    assert "cannot read the routing trace" in capsys.readouterr().err


@pytest.mark.slow
def test_moe_train_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["moe-train", "--output", str(out), "--steps", "3", "--num-layers", "2", "--num-experts", "4",
                 "--hidden-size", "32", "--moe-intermediate-size", "16", "--max-vocab", "512"]) == 0
    report = json.loads(capsys.readouterr().out)
    for name in ("train", "held-out", "untrained"):
        trace = RoutingTrace.load(report["traces"][name])
        assert trace.num_layers == 2 and trace.top_k == 2 and trace.num_experts == 4
        assert np.all(np.diff(trace.seq_offsets) == 128)
    assert report["affinity"]["held-out"]["tokens"] > 10_000
