"""Weight streaming on a CUDA GPU (tessera/offload/device_streamer.py): under a budget of a quarter of the
model the streamed layers live in pinned host memory and go through a ring of device buffers on a copy
stream; greedy outputs equal the resident GPU engine's exactly (fp32), the device holds the budget's
weights and no more, every step copies each streamed layer once, and closing frees the pinned copy and the
ring. The copy/compute order itself is checked on the CPU (test_ring_schedule.py). Run with `make test-gpu`."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

from tessera import LLM, SamplingParams
from tessera.errors import InvalidRequestError
from tessera.offload import DeviceLayerStreamer, StreamedLayer

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("pack_dir")]

DEEP = dict(num_hidden_layers=12, intermediate_size=768)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = random_prompts([5, 23, 9, 1])


def engine(path, **kw) -> LLM:
    return LLM(str(path), device="cuda", dtype="float32", progress=False, kv_cache_memory=8 << 20, **kw)


def tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quarter_budget_on_gpu_greedy_equals_all_on_device(saved_models, arch):
    path = saved_models(arch, **DEEP)
    ref = engine(path)
    want = tokens(ref)
    total = sum(p.numel() * p.element_size() for p in ref.engine.model.parameters())
    del ref
    llm = engine(path, weight_memory=total // 4)
    plan, streamer = llm.engine.model.weight_plan, llm.engine.weight_streamer
    assert isinstance(streamer, DeviceLayerStreamer)
    assert len(plan.streamed) >= DEEP["num_hidden_layers"] // 2, plan.describe()
    assert tokens(llm) == want
    on_device = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters() if p.is_cuda)
    assert on_device + streamer.buffer_bytes <= plan.budget + plan.region_bytes
    assert all(isinstance(m, StreamedLayer) for i, m in enumerate(llm.engine.model.layers) if i in plan.streamed)
    assert streamer.stats.layers_read >= GREEDY.max_tokens * len(plan.streamed)
    assert streamer.is_open and streamer.host_bytes == len(plan.streamed) * plan.region_bytes
    llm.close()
    assert not streamer.is_open
    assert tokens(llm) == want  # reopened: the pack is loaded into pinned memory again


def test_pinned_bandwidth_is_measured(saved_models):
    path = saved_models("llama", **DEEP)
    llm = engine(path, weight_memory=2 << 20)
    rates = llm.engine.weight_streamer.h2d_bandwidth(passes=2)
    assert len(rates) == 2 and all(r > 1e8 for r in rates)  # > 0.1 GB/s: any PCIe or NVLink link
    assert tokens(llm) == tokens(engine(path))  # the measurement leaves the ring usable


def test_quantized_streaming_on_gpu_is_refused_clearly(saved_models):
    with pytest.raises(InvalidRequestError, match="quantized weights runs on CPUs only"):
        engine(saved_models("llama", **DEEP), weight_memory=1 << 20, quantization="bits:4")


def test_unreadable_pack_gives_a_clear_error(saved_models, tmp_path):
    from tessera.offload import WeightStreamError

    llm = engine(saved_models("llama", **DEEP), weight_memory=2 << 20)
    streamer = llm.engine.weight_streamer
    tokens(llm)
    llm.close()
    with open(streamer.path, "r+b") as f:
        f.truncate(streamer.path.stat().st_size // 2)
    with pytest.raises(WeightStreamError, match="layer pack"):
        tokens(llm)
    assert not streamer.is_open
    assert torch.cuda.is_available()
