"""`tessera sim replay`: replay a trace in real time on one real tessera engine, in this process, and
record it in the fleet's result shape (tessera/fleet/metrics.py), the measured side of the simulator's
single-instance prediction.

Requests are added when the wall clock passes their (scaled) arrival time; the engine steps whenever it
has work; each output token is stamped when the step that produced it returns. Latencies count from the
trace's arrival time, so time a request spent waiting for a step in flight to end is included, as it
would be for a request reaching a server. Run it under the exclusive machine lock.
"""

from __future__ import annotations

import time
from collections import deque

from tessera.fleet.metrics import FleetResult, InstanceRecord, RequestRecord
from tessera.fleet.trace import TraceRequest
from tessera.sampling_params import SamplingParams


def replay_engine(engine, trace: list[TraceRequest], prompts: list[list[int]]) -> FleetResult:
    pending = deque(zip(trace, prompts, strict=True))
    records: dict[str, RequestRecord] = {}
    inst = InstanceRecord(0, "mixed", kv_bytes_per_block=engine.runner.kv_bytes_per_block(
        engine.model_config, engine.config.block_size, engine.dtype))
    bm = engine.block_manager
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while pending and pending[0][0].arrival <= now:
            tr, ids = pending.popleft()
            records[tr.request_id] = RequestRecord(tr.request_id, tr.arrival, tr.prompt_tokens, instances=[0])
            params = SamplingParams(max_tokens=tr.output_tokens, temperature=0.0, ignore_eos=True)
            engine.add_request(None, params, request_id=tr.request_id, stream=True, prompt_token_ids=ids)
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[0][0].arrival - (time.perf_counter() - t0)))
            continue
        start = time.perf_counter()
        outs = engine.step()
        end = time.perf_counter()
        inst.busy_time += end - start
        inst.steps += 1
        inst.peak_kv_blocks = max(inst.peak_kv_blocks, bm.num_used_blocks)
        for out in outs:
            rec = records[out.request_id]
            rec.token_times += [end - t0] * (len(out.outputs[0].token_ids) - rec.output_tokens)
            if out.finished:
                rec.finish = end - t0
                rec.completions += 1
    result = FleetResult("single", 1, "real", [records[t.request_id] for t in trace], [inst])
    done = [r.finish for r in result.requests if r.finish is not None]
    inst.span = (max(done) - trace[0].arrival) if done else 0.0
    return result
