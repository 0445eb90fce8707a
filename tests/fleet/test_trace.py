"""The shipped Azure 2023 slices: loading, rate scaling, clipping and the replayed token ids."""

from __future__ import annotations

import pytest

from tessera.errors import InvalidRequestError
from tessera.fleet.trace import DATA_DIR, TraceSpec, load_trace, prompt_token_ids


def test_slices_load_with_their_attribution():
    conv = load_trace(TraceSpec("conv"))
    code = load_trace(TraceSpec("code"))
    assert len(conv) == 4000 and len(code) == 2000
    assert conv[0].arrival == 0.0 and conv[0].prompt_tokens == 374 and conv[0].output_tokens == 44
    assert all(b.arrival >= a.arrival for a, b in zip(conv, conv[1:], strict=False))
    # 18:15:46.68059 -> 18:15:50.995169 (7 fractional digits in the file)
    assert conv[1].arrival == pytest.approx(4.314579, abs=1e-6)
    readme = (DATA_DIR / "README.md").read_text()
    assert "CC-BY 4.0" in readme and "Splitwise" in readme


def test_rate_scaling_keeps_shape_and_sets_mean_rate():
    own = load_trace(TraceSpec("conv", num_requests=200))
    scaled = load_trace(TraceSpec("conv", num_requests=200, request_rate=2.0))
    assert (len(scaled) - 1) / scaled[-1].arrival == pytest.approx(2.0)
    k = scaled[-1].arrival / own[-1].arrival
    assert all(s.arrival == pytest.approx(o.arrival * k) for s, o in zip(scaled, own, strict=True))
    halved = load_trace(TraceSpec("conv", num_requests=50, time_scale=0.5))
    assert halved[-1].arrival == pytest.approx(own[49].arrival * 0.5)
    with pytest.raises(InvalidRequestError):
        load_trace(TraceSpec("conv", request_rate=0))
    with pytest.raises(InvalidRequestError, match="not a shipped slice"):
        load_trace(TraceSpec("nope"))


def test_clipping():
    reqs = load_trace(TraceSpec("code", max_prompt_tokens=256, max_output_tokens=16, min_output_tokens=8))
    assert max(r.prompt_tokens for r in reqs) == 256 and min(r.prompt_tokens for r in reqs) >= 1
    assert max(r.output_tokens for r in reqs) == 16 and min(r.output_tokens for r in reqs) == 8


def test_prompt_ids_deterministic_and_shared_prefixes():
    spec = TraceSpec("conv", num_requests=40, max_prompt_tokens=128, vocab_size=1000, seed=3,
                     shared_prefix_tokens=32, shared_prefix_fraction=0.5, num_shared_prefixes=2)
    reqs = load_trace(spec)
    a = [prompt_token_ids(r, spec) for r in reqs]
    assert a == [prompt_token_ids(r, spec) for r in reqs]
    assert all(len(ids) == r.prompt_tokens and all(10 <= t < 1000 for t in ids) for ids, r in zip(a, reqs, strict=True))
    heads = [tuple(ids[:32]) for ids, r in zip(a, reqs, strict=True) if r.prompt_tokens > 32]
    common = max(heads.count(h) for h in set(heads))
    assert 5 <= common < len(heads)  # some share one of the two system prompts, not all
    other = TraceSpec("conv", num_requests=40, max_prompt_tokens=128, vocab_size=1000, seed=4)
    assert prompt_token_ids(reqs[0], other) != a[0]


def test_skip_requests_gives_a_slice_apart():
    head = load_trace(TraceSpec("conv", num_requests=60))
    tail = load_trace(TraceSpec("conv", skip_requests=40, num_requests=20))
    assert [r.index for r in tail] == list(range(40, 60))
    assert [(r.prompt_tokens, r.output_tokens) for r in tail] == [(r.prompt_tokens, r.output_tokens) for r in head[40:]]
    assert tail[0].arrival == 0.0
    assert [r.arrival for r in tail] == pytest.approx([r.arrival - head[40].arrival for r in head[40:]])
    spec = TraceSpec("conv")
    assert prompt_token_ids(tail[0], spec) == prompt_token_ids(head[40], spec)  # the trace's own prompt
    with pytest.raises(InvalidRequestError, match="cannot skip"):
        load_trace(TraceSpec("conv", skip_requests=10**6))
