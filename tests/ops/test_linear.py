"""Linear methods: every way of storing and multiplying a weight equals F.linear on the weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.ops.linear import DENSE, Linear, OneDNNPackedLinear, choose_linear_method, onednn_packs, prepare_linears


def _layer(k: int, n: int, bias: bool, dtype: torch.dtype) -> Linear:
    torch.manual_seed(0)
    layer = Linear(k, n, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("rows", [1, 3, 17, 64, 200, 513])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_packed_equals_dense_in_fp32(rows, bias):
    layer = _layer(72, 136, bias, torch.float32)
    assert prepare_linears(layer, OneDNNPackedLinear()).name == "onednn-packed"
    x = torch.randn(rows, 72)
    ref = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (rows, 136)
    # fp32 accumulation over K=72 in another order than the float64 reference: a few ulps of the sum.
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 64, 300])
def test_onednn_packed_equals_dense_in_bf16(rows):
    if not onednn_packs(torch.bfloat16):
        pytest.skip("oneDNN cannot pack bf16 weights on this CPU (no AVX512-BW/VL/DQ or AVX-NE-CONVERT)")
    layer = _layer(96, 160, False, torch.bfloat16)
    assert prepare_linears(layer, OneDNNPackedLinear()).name == "onednn-packed"
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    ref = x.double() @ layer.weight.double().T
    out = layer(x)
    assert out.dtype == torch.bfloat16
    # Products of bf16 inputs are exact in fp32; the fp32 sum is rounded once to bf16 (2^-8 relative).
    torch.testing.assert_close(out.double(), ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())


def test_packed_linear_keeps_leading_dims():
    layer = _layer(32, 48, True, torch.float32)
    prepare_linears(layer, OneDNNPackedLinear())
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_choice_per_device_and_dtype(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TESSERA_CPU_LINEAR", raising=False)
    assert choose_linear_method(cpu, torch.float32).name == "onednn-packed"
    bf16 = choose_linear_method(cpu, torch.bfloat16)
    assert bf16.name == "onednn-packed" if onednn_packs(torch.bfloat16) else bf16 is DENSE
    assert choose_linear_method(cpu, torch.float16) is DENSE
    monkeypatch.setenv("TESSERA_CPU_LINEAR", "dense")
    assert choose_linear_method(cpu, torch.float32) is DENSE
    monkeypatch.setenv("TESSERA_CPU_LINEAR", "fast")
    with pytest.raises(ValueError, match="TESSERA_CPU_LINEAR"):
        choose_linear_method(cpu, torch.float32)


def test_a_method_that_cannot_prepare_falls_back_to_dense():
    class Broken(OneDNNPackedLinear):
        def process_weights(self, layer):
            raise RuntimeError("no oneDNN here")

    layer = _layer(16, 16, False, torch.float32)
    assert prepare_linears(layer, Broken()) is DENSE
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_a_cpu_where_onednn_cannot_pack_bf16_gets_dense_bf16_and_quantized_models_still_load(monkeypatch, model_dir):
    """An AVX2-only CPU: torch's bf16 reorder raises there. bf16 must then be dense, including the layers a
    quantizing method leaves unquantized (the LM head), which could not fall back once others were quantized."""
    from tessera import LLM, SamplingParams
    from tessera.ops import linear

    monkeypatch.setattr(linear, "onednn_packs", lambda dtype: dtype != torch.bfloat16)
    assert choose_linear_method(torch.device("cpu"), torch.bfloat16) is DENSE
    assert choose_linear_method(torch.device("cpu"), torch.float32).name == "onednn-packed"
    llm = LLM(str(model_dir("llama")), dtype="bfloat16", quantization="bits:3", progress=False)
    assert llm.engine.runner.linear_method.fallback is DENSE
    out = llm.generate([[5, 17, 99]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
