"""The GPU streamer's own code (tessera/offload/device_streamer.py) run on the CPU with stand-ins for CUDA's
streams and events that log what they are asked: a model whose streamed layers go through its ring gives the
CPU streamer's greedy tokens, and the copies and events it issues are the ring schedule's, in its order
(test_ring_schedule.py checks that order). What only a GPU can show (real asynchrony, pinned-copy speed)
is in test_device_streaming.py (`make test-gpu`)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import random_prompts

from tessera import LLM, SamplingParams
from tessera.offload import DeviceLayerStreamer, StreamedLayer, device_streamer
from tessera.offload.ring_schedule import RingSchedule

pytestmark = pytest.mark.usefixtures("pack_dir")

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = random_prompts([5, 11, 1])


class FakeCuda:
    """torch.cuda's Stream / Event / stream() / current_stream(), executing at once and logging."""

    def __init__(self):
        self.log: list[tuple] = []
        self.current = self.Stream(self, "compute")

    class Stream:
        def __init__(self, fake, name="copy"):
            self.fake, self.name = fake, name

        def wait_event(self, event):
            self.fake.log.append(("wait", self.name, event.name))

        def synchronize(self):
            pass

    class Event:
        count = 0

        def __init__(self, fake, **kw):
            FakeCuda.Event.count += 1
            self.fake, self.name = fake, f"e{FakeCuda.Event.count}"

        def record(self, stream):
            self.fake.log.append(("record", stream.name, self.name))

    def install(self, monkeypatch):
        in_stream = []

        @contextlib.contextmanager
        def stream(s):
            in_stream.append(s)
            yield
            in_stream.pop()

        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: self.Stream(self))
        monkeypatch.setattr(torch.cuda, "Event", lambda **kw: self.Event(self, **kw))
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(device_streamer, "pinned_empty", lambda n: torch.empty(n, dtype=torch.uint8))


def test_ring_on_cpu_gives_the_same_tokens_and_issues_the_schedule(saved_models, monkeypatch):
    path = saved_models("llama", num_hidden_layers=8, intermediate_size=768)
    llm = LLM(str(path), dtype="float32", progress=False, kv_cache_memory=8 << 20, weight_memory=3 << 20)
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    cpu = llm.engine.weight_streamer
    llm.close()
    fake = FakeCuda()
    fake.install(monkeypatch)
    ring = DeviceLayerStreamer(cpu.path, cpu.layouts, cpu.order, cpu.make_layer, 3, torch.device("cpu"))
    for m in llm.engine.model.layers:
        if isinstance(m, StreamedLayer):
            m.streamer = ring
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert got == want
    # The ring's log, reduced to the schedule's terms, is the schedule: per used position a copy-done event
    # waited on by the compute stream, a release recorded on it, and the next copy waiting for that release.
    r = ring._pipeline
    copied = {e.name: s for s, e in enumerate(r.copied)}
    released = {e.name: s for s, e in enumerate(r.released)}
    ops = []
    for kind, stream, event in fake.log:
        if kind == "record" and stream == "copy":
            ops.append(("copy", copied[event]))
        elif kind == "record":
            ops.append(("release", released[event]))
        elif stream == "compute":
            ops.append(("compute", copied[event]))
    used = r.pos - r.start
    want_ops = [(op.kind, op.slot) for op in RingSchedule(len(cpu.order), 3).ops(r.start, used)]
    assert ops == want_ops
    waits = [(fake.log[i - 1]) for i, entry in enumerate(fake.log) if entry[:2] == ("record", "copy")]
    assert sum(w[0] == "wait" and w[2] in released for w in waits) == used  # each refill waited for its release
    ring.close()
    assert not ring.is_open
