"""Weight streaming (tessera/offload): under a weight budget of a quarter of the model, greedy outputs equal
the fully resident engine's exactly, the resident weights stay within the budget, and a pack that breaks
mid-run gives a clear error and leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch
from conftest import random_prompts

from tessera import LLM, SamplingParams
from tessera.config import EngineConfig, parse_memory_size
from tessera.errors import InvalidRequestError
from tessera.offload import StreamedLayer, WeightMemoryError, WeightStreamError
from tessera.offload.layer_pack import ALIGN

# Deep and narrow enough that a quarter of the model holds the embeddings, two layer buffers and a layer or
# so: most layers stream.
DEEP = dict(num_hidden_layers=12, intermediate_size=768)
ARCHS = ["llama", "llama_mqa_tied", "mistral", "qwen2", "qwen3"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = random_prompts([5, 23, 9, 1])

pytestmark = pytest.mark.usefixtures("pack_dir")  # every test here writes layer packs


@pytest.fixture(scope="module")
def deep_model(saved_models):
    return lambda arch: saved_models(arch, **DEEP)


def engine(path, **kw) -> LLM:
    return LLM(str(path), dtype="float32", progress=False, kv_cache_memory=8 << 20, **kw)


def weight_bytes(llm: LLM) -> int:
    return sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())


def tokens(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tessera-weight-reader" and t.is_alive()]


@pytest.mark.parametrize("arch", ARCHS)
def test_quarter_budget_greedy_equals_resident(deep_model, arch):
    path = deep_model(arch)
    ref = engine(path)
    want, total = tokens(ref), weight_bytes(ref)
    llm = engine(path, weight_memory=total // 4)
    plan = llm.engine.model.weight_plan
    assert len(plan.streamed) >= DEEP["num_hidden_layers"] // 2, plan.describe()
    assert tokens(llm) == want
    # The engine's own accounting and what it actually holds: resident parameters + the open buffers.
    streamer = llm.engine.weight_streamer
    assert streamer.is_open and streamer.stats.layers_read >= len(plan.streamed) * GREEDY.max_tokens
    held = weight_bytes(llm) + streamer.buffer_bytes
    assert plan.resident_bytes <= plan.budget
    assert held <= plan.budget + plan.region_bytes
    assert held <= plan.resident_bytes + plan.num_buffers * ALIGN
    assert sum(isinstance(m, StreamedLayer) for m in llm.engine.model.layers) == len(plan.streamed)
    llm.close()
    assert not streamer.is_open and not reader_threads()


def test_buffered_reads_and_pack_reuse(deep_model, pack_dir, monkeypatch):
    """Buffered reads dropped from the page cache (TESSERA_OFFLOAD_IO=buffered; O_DIRECT is the default) give
    the same tokens; a second engine on the same checkpoint and budget reuses the pack instead of writing it."""
    path = deep_model("qwen2")
    ref = engine(path)
    want, budget = tokens(ref), weight_bytes(ref) // 4
    monkeypatch.setenv("TESSERA_OFFLOAD_IO", "buffered")
    first = engine(path, weight_memory=budget)
    assert tokens(first) == want and first.engine.weight_streamer.stats.io_mode == "buffered"
    first.close()
    (pack,) = pack_dir.glob("*.pack")
    stamp = pack.stat().st_mtime_ns
    monkeypatch.delenv("TESSERA_OFFLOAD_IO")
    second = engine(path, weight_memory=budget)
    assert pack.stat().st_mtime_ns == stamp and len(list(pack_dir.glob("*.pack"))) == 1
    assert tokens(second) == want
    # O_DIRECT where the file system has it (a tmpfs tmp directory has not: then buffered)
    assert second.engine.weight_streamer.stats.io_mode in ("direct", "buffered")
    second.close()


def test_budget_below_resident_parts_and_two_buffers_is_refused(deep_model):
    path = deep_model("llama")
    with pytest.raises(WeightMemoryError, match="below the minimum for streaming.*2 layer buffers"):
        engine(path, weight_memory=300_000)  # the embeddings alone are 262 KB
    everything = engine(path, weight_memory="1GiB")  # all fits: nothing streams
    assert everything.engine.weight_streamer is None and not everything.engine.model.weight_plan.streamed


def test_broken_pack_mid_run_raises_names_file_and_frees_everything(deep_model, pack_dir, tmp_path):
    path = deep_model("llama")
    ref = engine(path)
    want = tokens(ref)
    llm = engine(path, weight_memory=weight_bytes(ref) // 4)
    eng = llm.engine
    free0 = eng.block_manager.num_free_blocks
    assert tokens(llm) == want
    (pack,) = pack_dir.glob("*.pack")
    backup = tmp_path / "backup.pack"
    shutil.copy(pack, backup)
    os.truncate(pack, pack.stat().st_size // 2)  # the later layers are gone
    with pytest.raises(WeightStreamError, match=f"cannot read decoder layer \\d+ from the layer pack {pack}"):
        tokens(llm)
    assert not eng.weight_streamer.is_open and not reader_threads()
    assert not eng.has_unfinished_requests() and eng.block_manager.num_free_blocks == free0
    pack.unlink()
    with pytest.raises(WeightStreamError, match=f"cannot open the layer pack {pack}"):
        tokens(llm)
    assert not reader_threads()
    shutil.copy(backup, pack)  # the file is back: the same engine works again
    assert tokens(llm) == want
    llm.close()


def test_config_and_refusals():
    assert parse_memory_size("2GiB") == 2 << 30 and parse_memory_size("512MB") == 512_000_000
    assert parse_memory_size("3e9") == 3_000_000_000 and parse_memory_size(1234) == 1234
    cfg = EngineConfig(weight_memory="1.5 GiB")
    cfg.validate()
    assert cfg.weight_memory == 3 << 29
    with pytest.raises(InvalidRequestError, match="not a memory size"):
        EngineConfig(weight_memory="lots").validate()
    EngineConfig(weight_memory=1 << 30, quantization="bits:4").validate()  # quantized layers stream too
    if not torch.cuda.is_available():
        return
    with pytest.raises(InvalidRequestError, match="runs on CPUs"):
        LLM(device="cuda", weight_memory=1 << 20, progress=False)


def test_plan_interleaves_streamed_layers_and_counts_buffers():
    from tessera.offload.plan import plan_weights, spread, streaming_token_budget

    assert spread(3, 10) == (3, 6, 9) and spread(10, 10) == tuple(range(10)) and spread(0, 4) == ()
    mb = 1 << 20
    plan = plan_weights(budget=100 * mb, always_bytes=20 * mb, layer_bytes=10 * mb, region_bytes=10 * mb,
                        num_layers=12)
    # 20 always + 2 buffers x 10 leaves 60: six resident layers, six streamed, every other one
    assert plan.resident_layers == 6 and plan.streamed == (1, 3, 5, 7, 9, 11)
    assert plan.resident_bytes == 100 * mb and plan.streamed_bytes_per_step == 60 * mb
    assert not plan_weights(140 * mb, 20 * mb, 10 * mb, 10 * mb, 12).streamed  # 20 + 120 fits whole
    with pytest.raises(WeightMemoryError):
        plan_weights(39 * mb, 20 * mb, 10 * mb, 10 * mb, 12)
    assert streaming_token_budget(2048) == 8192 and streaming_token_budget(10_000) == 10_000
