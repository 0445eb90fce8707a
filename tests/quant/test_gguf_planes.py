"""GGUF blocks kept quantized: tessera's layout dequantizes to exactly what the gguf package gives,
and the default model runs from its own Q4_1 file."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from tessera import LLM, SamplingParams
from tessera.errors import InvalidRequestError, UnsupportedModelError
from tessera.quant.gguf_planes import blocks_to_quantized, permute_rows, stack_rows


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("n,k", [(3, 32), (5, 96), (8, 576)])
def test_blocks_dequantize_exactly_as_gguf(qtype, n, k):
    rng = np.random.default_rng(n * k)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 3, (n, 1))).astype(np.float32)
    t = GGMLQuantizationType[qtype]
    data = quants.quantize(w, t)
    want = quants.dequantize(data, t).reshape(n, k)
    qw = blocks_to_quantized(data, qtype, n, k)
    assert qw.group_size == 32 and qw.bits == (8 if qtype == "Q8_0" else 4)
    assert torch.equal(qw.dequantize(), torch.from_numpy(np.ascontiguousarray(want)))


def test_row_operations_keep_values():
    rng = np.random.default_rng(0)
    a = blocks_to_quantized(quants.quantize(rng.standard_normal((4, 64)).astype(np.float32),
                                            GGMLQuantizationType.Q4_1), "Q4_1", 4, 64)
    b = blocks_to_quantized(quants.quantize(rng.standard_normal((2, 64)).astype(np.float32),
                                            GGMLQuantizationType.Q8_0), "Q8_0", 2, 64)
    both = stack_rows([a, b])
    assert both.bits == 8
    assert torch.equal(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    order = np.array([3, 0, 2, 1])
    assert torch.equal(permute_rows(a, order).dequantize(), a.dequantize()[torch.from_numpy(order)])


def test_unsupported_blocks_are_named():
    with pytest.raises(UnsupportedModelError, match="Q6_K cannot be kept quantized"):
        blocks_to_quantized(np.zeros((1, 210), np.uint8), "Q6_K", 1, 256)


def test_default_model_runs_from_its_own_q4_1_blocks():
    """The converted fp32 model holds exactly the GGUF's dequantized values, so running the blocks as
    bit planes must give the same greedy tokens (only the summation order differs)."""
    params = SamplingParams(temperature=0, max_tokens=16)
    prompts = ["The capital of France is", "Water boils at"]
    q = LLM(dtype="float32", quantization="gguf", progress=False)
    layers = [m for m in q.engine.model.modules() if getattr(m, "qweight", None) is not None]
    assert len(layers) == 4 * q.engine.model_config.num_layers and all(m.qweight.bits == 4 for m in layers)
    dense = LLM(dtype="float32", progress=False)
    # The LM head from the file's tied token_embd (Q8_0) blocks: the converted model holds the same values.
    head = LLM(dtype="float32", quantization="gguf", quantize_lm_head=True, progress=False)
    assert head.engine.model.lm_head.qweight.bits == 8
    want = dense.generate(prompts, params, use_tqdm=False)
    for llm in (q, head):
        for a, b in zip(llm.generate(prompts, params, use_tqdm=False), want, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_gguf_quantization_needs_a_gguf_file(model_dir):
    with pytest.raises(InvalidRequestError, match="needs a .gguf"):
        LLM(str(model_dir("llama")), quantization="gguf", progress=False)
