"""GGUF blocks kept quantized: tessera's layout dequantizes to exactly what the gguf package gives,
and the default model runs from its own Q4_1 file."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from gguf_files import random_blocks, tiny_model, write_gguf

from tessera import LLM, SamplingParams
from tessera.errors import InvalidRequestError, UnsupportedModelError
from tessera.quant.gguf_planes import LAYOUTS, blocks_to_quantized, permute_rows, stack_rows


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
@pytest.mark.parametrize("n,k", [(3, 32), (5, 96), (8, 576)])
def test_blocks_dequantize_exactly_as_gguf(qtype, n, k):
    rng = np.random.default_rng(n * k)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 3, (n, 1))).astype(np.float32)
    t = GGMLQuantizationType[qtype]
    data = quants.quantize(w, t)
    want = quants.dequantize(data, t).reshape(n, k)
    qw = blocks_to_quantized(data, qtype, n, k)
    assert qw.group_size == 32 and qw.bits == LAYOUTS[qtype][0]
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


@pytest.mark.parametrize("qtype", list(LAYOUTS))
def test_every_block_type_is_exact_as_bit_planes(qtype):
    """Random codes, sub-scales and fp16 scales of every supported type (the k-quants included, which
    gguf's Python code cannot quantize): tessera's layout gives gguf's dequantization bit for bit."""
    rng = np.random.default_rng(len(qtype))
    n, k = 6, 512
    data = random_blocks(qtype, n, k, rng)
    want = quants.dequantize(data, GGMLQuantizationType[qtype]).reshape(n, k)
    qw = blocks_to_quantized(data, qtype, n, k)
    assert (qw.bits, qw.group_size) == LAYOUTS[qtype][:2]
    assert np.isfinite(want).all()
    assert torch.equal(qw.dequantize(), torch.from_numpy(np.ascontiguousarray(want)))


def test_mixed_types_fuse_to_the_widest_width_and_smallest_group():
    """A Q4_K_M file stores some attn_v as Q6_K (6 bits, groups of 16) beside Q4_K q/k (4 bits, 32)."""
    rng = np.random.default_rng(1)
    parts = [blocks_to_quantized(random_blocks(t, n, 256, rng), t, n, 256)
             for t, n in (("Q4_K", 4), ("Q4_K", 2), ("Q6_K", 2))]
    fused = stack_rows(parts)
    assert (fused.bits, fused.group_size) == (6, 16)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))


def test_unsupported_blocks_are_named():
    with pytest.raises(UnsupportedModelError, match="IQ4_NL cannot be kept quantized"):
        blocks_to_quantized(np.zeros((1, 18), np.uint8), "IQ4_NL", 1, 32)
    with pytest.raises(UnsupportedModelError, match="K % 256"):
        blocks_to_quantized(np.zeros((1, 144), np.uint8), "Q4_K", 1, 128)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_k_quant_gguf_runs_from_its_blocks(tmp_path, monkeypatch, arch):
    """A Q4_K_M-like file (Q4_K, with attn_v and ffn_down in Q6_K): kept quantized, it gives the greedy
    tokens of the same file dequantized to fp32, and it never makes that fp32 copy."""
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_model(arch, hidden=256, inter=256, vocab=256)
    rng = np.random.default_rng(0)
    raw = {}
    for name, t in model.state_dict().items():
        if t.ndim == 2 and "embed" not in name and "lm_head" not in name:
            qtype = "Q6_K" if ("v_proj" in name or "down_proj" in name) else "Q4_K"
            raw[name] = (random_blocks(qtype, t.shape[0], t.shape[1], rng, scale=0.02), GGMLQuantizationType[qtype])
    path = write_gguf(model, tmp_path / "m.gguf", arch=arch, raw=raw)
    dense = LLM(str(path), dtype="float32", progress=False)
    import tessera.models.gguf as gguf_module

    def no_fp32_conversion(*a, **k):
        raise AssertionError("quantization='gguf' must not convert the file to fp32")

    monkeypatch.setattr(gguf_module, "convert_gguf", no_fp32_conversion)
    q = LLM(str(path), dtype="float32", quantization="gguf", progress=False)
    bits = sorted({m.qweight.bits for m in q.engine.model.modules() if getattr(m, "qweight", None) is not None})
    assert bits == [4, 6]  # o_proj and gate_up stay 4-bit; qkv (v is Q6_K) and down are 6-bit
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 17, 99, 3], [200, 1, 45, 67, 89, 11, 23]]
    for a, b in zip(q.generate(prompts, params, use_tqdm=False), dense.generate(prompts, params, use_tqdm=False),
                    strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


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
