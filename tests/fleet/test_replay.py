"""Replaying a trace on one real engine yields the shared result record, every request once."""

from __future__ import annotations

from tessera.config import EngineConfig
from tessera.engine.llm_engine import LLMEngine
from tessera.fleet.replay import replay_engine
from tessera.fleet.trace import TraceSpec, load_trace, prompt_token_ids


def test_replay_on_a_real_engine(model_dir):
    spec = TraceSpec("conv", num_requests=8, request_rate=40.0, max_prompt_tokens=24, max_output_tokens=5,
                     vocab_size=512)
    trace = load_trace(spec)
    engine = LLMEngine(EngineConfig(model=str(model_dir("llama")), dtype="float32", kv_cache_memory=8 << 20),
                       progress=False)
    res = replay_engine(engine, trace, [prompt_token_ids(r, spec) for r in trace])
    assert [r.request_id for r in res.requests] == [t.request_id for t in trace]
    for rec, tr in zip(res.requests, trace, strict=True):
        assert rec.completions == 1 and rec.output_tokens == tr.output_tokens
        assert rec.ttft > 0 and rec.finish == rec.token_times[-1] and rec.e2e >= rec.ttft
    s = res.summary()
    assert s["source"] == "real" and s["completed"] == 8 and 0 < s["instances"][0]["idle_fraction"] < 1
    assert s["instances"][0]["peak_kv_bytes"] > 0
