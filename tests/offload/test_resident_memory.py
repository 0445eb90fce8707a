"""Measured, not only accounted: a process streaming a 420 MB model under a quarter budget grows its peak
resident set by at most the budget + one layer (+ a fixed allowance for the KV cache, activations and
allocator slack), while the resident engine grows by more than the model. The same with the layers
quantized at load (bits:4): a quarter of the quantized model, loading included, so quantizing streams too,
and with no budget the resident quantized engine grows by the quantized model, never the dense one.
Each run is its own process, its peak reset (/proc/self/clear_refs) just before the engine is built, after
a first engine on a tiny model has paid for the imports and kernels that any engine needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.bench.offload_model import LlamaShape, write_random_llama

REPO = Path(__file__).resolve().parents[2]
SHAPE = LlamaShape(hidden_size=512, intermediate_size=2048, num_hidden_layers=24, num_attention_heads=8,
                   num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512)
TINY = LlamaShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512)
SLACK = 48 << 20  # KV pages written, activations, kernels' code, malloc arenas

RUN = r"""
import json, sys, torch
from pathlib import Path
from tessera import LLM, SamplingParams

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

torch.set_num_threads(2)
budget = int(sys.argv[2]) or None
quant = sys.argv[4] or None
params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
# A first engine on a tiny model: imports, kernels and tokenizer code paths are then paid before the baseline.
warm = LLM(sys.argv[3], dtype="float32", progress=False, kv_cache_memory=16 << 20, max_model_len=512,
           quantization=quant)
warm.generate([[5, 6, 7]], params, use_tqdm=False)
del warm
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
before = status("VmRSS")
llm = LLM(sys.argv[1], dtype="float32", progress=False, kv_cache_memory=16 << 20, max_model_len=512,
          weight_memory=budget, quantization=quant)
outs = llm.generate([[5, 6, 7, 8, 9] * 3] * 4, params, use_tqdm=False)
plan = getattr(llm.engine.model, "weight_plan", None)
print(json.dumps({"growth": status("VmHWM") - before, "tokens": [o.outputs[0].token_ids for o in outs],
                  "region": plan.region_bytes if plan else 0, "streamed": len(plan.streamed) if plan else 0}))
"""


def run(model: Path, budget: int, env: dict, tiny: Path, quantization: str = "") -> dict:
    out = subprocess.run([sys.executable, "-c", RUN, str(model), str(budget), str(tiny), quantization],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_streaming_peak_rss_within_budget_plus_one_layer(tmp_path):
    import torch

    model = write_random_llama(tmp_path / "model", SHAPE, dtype=torch.float32)
    tiny = write_random_llama(tmp_path / "tiny", TINY, dtype=torch.float32)
    size = SHAPE.params * 4
    env = {**os.environ, "PYTHONPATH": str(REPO), "TESSERA_OFFLOAD_DIR": str(tmp_path / "packs")}
    budget = size // 4
    resident = run(model, 0, env, tiny)
    streamed = run(model, budget, env, tiny)
    assert streamed["streamed"] >= SHAPE.num_hidden_layers // 2
    assert streamed["tokens"] == resident["tokens"]
    assert resident["growth"] > 0.9 * size, resident  # the measurement sees a whole model
    assert streamed["growth"] <= budget + streamed["region"] + SLACK, (streamed, budget)
    again = run(model, budget, env, tiny)  # the pack is reused: loading reads only the resident tensors
    assert again["growth"] <= budget + streamed["region"] + SLACK and again["tokens"] == resident["tokens"]


# Quantized, the FFN dominates and the vocabulary is small: a quarter of the 4-bit model (~10 MB) holds the
# dense embeddings, the two stream buffers and a layer, while the fp32 checkpoint is 270 MB.
QSHAPE = LlamaShape(hidden_size=512, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=512, max_position_embeddings=512)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_quantized_streaming_peak_rss_within_budget_plus_one_layer(tmp_path):
    import torch

    from tessera.config import ModelConfig
    from tessera.offload.streamed_model import WeightSource, weight_bytes
    from tessera.quant.quantize import QuantSpec

    model = write_random_llama(tmp_path / "model", QSHAPE, dtype=torch.float32)
    tiny = write_random_llama(tmp_path / "tiny", TINY, dtype=torch.float32)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TESSERA_OFFLOAD_DIR": str(tmp_path / "packs")}
    quantized = weight_bytes(ModelConfig.from_dir(model), torch.float32, WeightSource(quant=QuantSpec(4)))
    budget = quantized // 4
    resident = run(model, 0, env, tiny, "bits:4")
    streamed = run(model, budget, env, tiny, "bits:4")
    assert streamed["streamed"] >= QSHAPE.num_hidden_layers // 2
    assert streamed["tokens"] == resident["tokens"]
    # Resident too, the layers are quantized as they are read: the fp32 model (270 MB) is never whole in memory.
    assert resident["streamed"] == 0 and resident["growth"] <= quantized + SLACK, (resident, quantized)
    assert streamed["growth"] <= budget + streamed["region"] + SLACK, (streamed, budget)
