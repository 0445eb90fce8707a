"""Quantized weight streaming (tessera/offload/quantized_layers.py): under a budget of a quarter of the
quantized model, greedy outputs equal the fully resident quantized engine's exactly (fp32 activations),
whether the layers are quantized at load (bits:N), come from tessera's quantized checkpoint (not quantized
again) or from a GGUF file kept quantized (mixed block types: layers of different layouts); the pack holds
the quantized bytes and a step reads only them; a pack that breaks mid-run gives a clear error."""

from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest
import torch
from conftest import random_prompts
from gguf import GGMLQuantizationType as Q
from gguf_files import random_blocks, tiny_model, write_gguf

from tessera import LLM, SamplingParams
from tessera.offload import StreamedLayer, WeightSource, WeightStreamError
from tessera.offload.layer_pack import ALIGN
from tessera.offload.streamed_model import layer_layouts
from tessera.quant.bits_linear import quantized_bytes
from tessera.quant.checkpoint import read_layout
from tessera.quant.convert import quantize_checkpoint
from tessera.quant.quantize import QuantSpec

# A small vocabulary and a wide FFN, so that quantized layers, not the (dense) embeddings, make most of the
# quantized model: a quarter of it then holds the embeddings and the two stream buffers, and most layers stream.
QDEEP = dict(num_hidden_layers=12, intermediate_size=1024, vocab_size=128)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = random_prompts([5, 23, 9, 1], vocab=128)

pytestmark = pytest.mark.usefixtures("pack_dir")  # every test here writes layer packs


@pytest.fixture(scope="module")
def qdeep_model(saved_models):
    return lambda arch: saved_models(arch, **QDEEP)


def engine(path, **kw) -> LLM:
    return LLM(str(path), dtype="float32", progress=False, kv_cache_memory=8 << 20, **kw)


def held_bytes(llm: LLM) -> int:
    """Resident weight bytes: bit-plane tiles, scales and offsets, and the dense parameters."""
    q, dense = quantized_bytes(llm.engine.model)
    return q + dense


def tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tessera-weight-reader" and t.is_alive()]


def check_streamed(llm: LLM, want: list[list[int]], min_streamed: int) -> None:
    """Same tokens; resident weights + open buffers within the budget + one layer; every decode step read
    each streamed layer's quantized region and nothing more."""
    plan, streamer = llm.engine.model.weight_plan, llm.engine.weight_streamer
    assert len(plan.streamed) >= min_streamed, plan.describe()
    assert tokens(llm) == want
    held = held_bytes(llm) + streamer.buffer_bytes
    assert plan.resident_bytes <= plan.budget
    assert held <= plan.budget + plan.region_bytes, (held, plan.describe())
    assert held <= plan.resident_bytes + plan.num_buffers * ALIGN
    # Every streamed layer was read at every step, one quantized region per read.
    stats = streamer.stats
    assert stats.layers_read >= GREEDY.max_tokens * len(plan.streamed)
    assert stats.bytes_read <= stats.layers_read * plan.region_bytes
    assert sum(isinstance(m, StreamedLayer) for m in llm.engine.model.layers) == len(plan.streamed)


@pytest.mark.parametrize("arch,bits", [("llama", 4), pytest.param("qwen2", 3, marks=pytest.mark.slow),
                                       pytest.param("qwen3", 4, marks=pytest.mark.slow)])
def test_bits_quarter_budget_greedy_equals_resident_quantized(qdeep_model, arch, bits):
    path = qdeep_model(arch)
    ref = engine(path, quantization=f"bits:{bits}")
    want, total = tokens(ref), held_bytes(ref)
    llm = engine(path, quantization=f"bits:{bits}", weight_memory=total // 4)
    check_streamed(llm, want, QDEEP["num_hidden_layers"] // 2)
    # The pack holds the quantized layer: about bits/32 of the fp32 layer, plus the group scales and offsets
    # (1/32 at group 64) and K's padding to 64 (qwen2's hidden 96).
    plan, cfg = llm.engine.model.weight_plan, llm.engine.model_config
    dense_layer = layer_layouts(cfg, torch.float32, WeightSource())[0].nbytes
    assert plan.region_bytes < dense_layer * (bits + 3) / 32 + 4 * ALIGN, (plan.region_bytes, dense_layer)
    streamer = llm.engine.weight_streamer
    llm.close()
    assert not streamer.is_open and not reader_threads()


def test_quantized_checkpoint_streams_without_quantizing_again(qdeep_model, tmp_path, monkeypatch):
    """tessera's saved quantized checkpoint (safetensors + bitplanes.json) loads into the streamer as it is."""
    out = quantize_checkpoint(qdeep_model("llama"), tmp_path / "q", QuantSpec(4, 32, "hqq"), progress=False)
    ref = engine(out)
    want, total = tokens(ref), held_bytes(ref)

    def refuse(*a, **k):
        raise AssertionError("a quantized checkpoint must not be quantized again")

    monkeypatch.setattr("tessera.offload.streamed_model.quantize_weight", refuse)
    monkeypatch.setattr("tessera.quant.bits_linear.quantize_weight", refuse)
    llm = engine(out, weight_memory=total // 4)
    check_streamed(llm, want, QDEEP["num_hidden_layers"] // 2)
    llm.close()


def test_gguf_kept_quantized_streams_layers_of_different_layouts(tmp_path):
    """A GGUF file's own blocks (quantization="gguf"), one layer's down projection in another type (as
    Q4_K_M files keep some at Q6_K): two region layouts in one pack, both streamed."""
    model = tiny_model("llama", inter=256, vocab=128, layers=4)
    down = "model.layers.1.mlp.down_proj.weight"
    n, k = model.state_dict()[down].shape
    raw = {down: (random_blocks("Q6_K", n, k, np.random.default_rng(0), scale=0.02), Q.Q6_K)}
    path = write_gguf(model, tmp_path / "mixed.gguf", Q.Q8_0, raw=raw)
    ref = engine(path, quantization="gguf")
    want = tokens(ref)
    layouts = layer_layouts(ref.engine.model_config, ref.engine.dtype,
                            WeightSource(checkpoint=read_layout(ref.engine.model_path)))
    assert layouts[0] is not layouts[1]  # 8-bit and 6-bit down projections
    always = held_bytes(ref) - sum(lay.nbytes for lay in layouts)
    # Room for the two buffers and half a layer: both layers stream.
    budget = always + 2 * max(lay.region_bytes for lay in layouts) + min(lay.nbytes for lay in layouts) // 2
    llm = engine(path, quantization="gguf", weight_memory=budget)
    check_streamed(llm, want, 4)
    assert len({id(lay) for lay in llm.engine.weight_streamer.layouts}) == 2
    llm.close()


def test_truncated_quantized_pack_mid_run_raises_and_recovers(qdeep_model, pack_dir, tmp_path):
    path = qdeep_model("llama")
    ref = engine(path, quantization="bits:4")
    want = tokens(ref)
    llm = engine(path, quantization="bits:4", weight_memory=held_bytes(ref) // 4)
    eng = llm.engine
    free0 = eng.block_manager.num_free_blocks
    assert tokens(llm) == want
    (pack,) = pack_dir.glob("*.pack")
    backup = tmp_path / "backup.pack"
    shutil.copy(pack, backup)
    os.truncate(pack, pack.stat().st_size - eng.model.weight_plan.region_bytes // 2)  # the last layer is cut
    with pytest.raises(WeightStreamError, match=f"cannot read decoder layer \\d+ from the layer pack {pack}"):
        tokens(llm)
    assert not eng.weight_streamer.is_open and not reader_threads()
    assert not eng.has_unfinished_requests() and eng.block_manager.num_free_blocks == free0
    shutil.copy(backup, pack)
    assert tokens(llm) == want
    llm.close()
