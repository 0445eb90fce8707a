"""The bit-plane linear layer and kernel: equal to dequantize-then-matmul in fp32 (1e-5 relative),
for every width and awkward shapes; and quantized models run end to end through the Linear seam."""

import pytest
import torch

from tessera import LLM, SamplingParams
from tessera.errors import InvalidRequestError
from tessera.quant.bitplanes import tile_group_params, tile_planes
from tessera.quant.bits_linear import canonical
from tessera.quant.kernel_choice import tune_bitplane_kernels
from tessera.quant.quantize import QuantSpec, quantize_activations, quantize_weight


def quantized_layers(llm: LLM) -> dict:
    return {n: m for n, m in llm.engine.model.named_modules() if getattr(m, "qweight", None) is not None}


def assert_agrees_with_dequantized_dense(q: LLM, dense: LLM, prompts, params) -> None:
    """Load each quantized layer's dequantized weight into the same layer of `dense` (a new Parameter,
    so a tied LM head leaves the dense embeddings alone; repacked by the dense method), then: same
    greedy tokens, chosen-token logprobs within 1e-4 (only summation order differs)."""
    qlayers = quantized_layers(q)
    with torch.no_grad():
        for name, layer in dense.engine.model.named_modules():
            if name in qlayers:
                layer.weight = torch.nn.Parameter(canonical(qlayers[name]).dequantize(), requires_grad=False)
                layer.method.process_weights(layer)
    a, b = q.generate(prompts, params, use_tqdm=False), dense.generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b, strict=True):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs, strict=True):
            (tx, px), (ty, py) = next(iter(lx.items())), next(iter(ly.items()))
            assert tx == ty and abs(px.logprob - py.logprob) <= 1e-4 * max(1.0, abs(py.logprob))


@pytest.mark.parametrize("bits", range(1, 9))
def test_kernel_equals_dequantize_then_matmul(kernels, bits):
    g = torch.Generator().manual_seed(bits)
    for (n, k, group) in [(37, 100, 64), (16, 64, 16), (50, 300, 128), (33, 577, 32)]:
        qw = quantize_weight(torch.randn(n, k, generator=g), QuantSpec(bits, group))
        tiles, scale, offset = tile_planes(qw.planes), tile_group_params(qw.scale), tile_group_params(qw.offset)
        bias = torch.randn(n, generator=g)
        for m in (1, 3, 6):
            x = torch.randn(m, k, generator=g)
            want = (x.double() @ qw.dequantize().double().T) + bias.double()
            out = torch.empty(m, n)
            kernels.bitplane_linear(out, x, tiles, scale, offset, n, bias)
            rel = float((out.double() - want).abs().max() / want.abs().max())
            assert rel < 1e-5, (n, k, group, m, rel)
        out16 = torch.empty(1, n, dtype=torch.bfloat16)
        kernels.bitplane_linear(out16, x[:1].bfloat16(), tiles, scale, offset, n, None)
        want16 = x[:1].bfloat16().double() @ qw.dequantize().double().T
        assert float((out16.double() - want16).abs().max() / want16.abs().max()) < 1e-2  # bf16 output rounding


def int8_activation_reference(x: torch.Tensor, qw, bias: torch.Tensor | None) -> torch.Tensor:
    """What act_bits=8 computes, in float64 from its integers: per group, sx * (scale * sum(code * qx) +
    offset * sum(qx)), summed over groups (+ bias)."""
    qx, sx = quantize_activations(x, qw.group_size)
    codes = qw.codes().long()
    kp = qx.shape[1]
    codes = torch.nn.functional.pad(codes, (0, kp - codes.shape[1]))
    m, n, g = x.shape[0], codes.shape[0], qw.group_size
    dots = torch.einsum("mgk,ngk->mng", qx.long().view(m, -1, g), codes.view(n, -1, g))  # exact integers
    sums = qx.long().view(m, -1, g).sum(-1)  # [m, groups]
    y = (sx.double()[:, None, :] * (qw.scale.double()[None] * dots.double()
                                     + qw.offset.double()[None] * sums.double()[:, None, :])).sum(-1)
    return y + (0 if bias is None else bias.double())


@pytest.mark.parametrize("bits", range(1, 9))
def test_int8_activation_kernel_equals_its_integer_reference(kernels, bits):
    """act_bits=8: x rounded to int8 per group as quantize_activations does, then exact integer sums of codes
    times int8 activations, scaled in fp32: equal to the float64 reference of the same integers within fp32
    rounding (1e-6 relative; one wrong code bit or rounding would be ~1e-2). Shapes with K not a multiple of
    the group or of 64, rows of x that are all zero, every output dtype."""
    g = torch.Generator().manual_seed(bits + 200)
    for (n, k, group) in [(37, 100, 64), (16, 64, 16), (50, 300, 128), (33, 577, 32)]:
        qw = quantize_weight(torch.randn(n, k, generator=g), QuantSpec(bits, group))
        tiles, scale, offset = tile_planes(qw.planes), tile_group_params(qw.scale), tile_group_params(qw.offset)
        bias = torch.randn(n, generator=g)
        for m in (1, 2, 5, 11):  # 11: more rows than one pass of the kernel takes (4 with AVX2, 8 with VNNI)
            x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10
            x[m // 2, : min(k, group)] = 0  # a zero group: scale 0, codes 0
            want = int8_activation_reference(x, qw, bias)
            out = torch.empty(m, n)
            kernels.bitplane_linear(out, x, tiles, scale, offset, n, bias, 8)
            rel = float((out.double() - want).abs().max() / want.abs().max())
            assert rel < 1e-6, (n, k, group, m, rel)
            # int8 activations are not exact: against dequantize-then-matmul the error is that of 8-bit x
            exact = x.double() @ qw.dequantize().double().T + bias.double()
            assert 1e-5 < float((out.double() - exact).abs().max() / exact.abs().max()) < 0.05
        for dtype in (torch.bfloat16, torch.float16):  # output rounding only
            out16 = torch.empty(m, n, dtype=dtype)
            kernels.bitplane_linear(out16, x.to(dtype), tiles, scale, offset, n, None, 8)
            want16 = int8_activation_reference(x.to(dtype), qw, None)
            assert float((out16.double() - want16).abs().max() / want16.abs().max()) < 1e-2
    with pytest.raises(RuntimeError, match="act_bits must be 0"):
        kernels.bitplane_linear(torch.empty(1, n), x[:1], tiles, scale, offset, n, None, 4)


def test_int8_activations_in_the_engine(model_dir):
    """LLM(activation_bits=8), fp32: every quantized product takes the integer kernel whatever the batch (so a prompt
    decodes to the same tokens alone and in a batch of 40, past every batched-kernel threshold), and the
    option is checked."""
    llm = LLM(str(model_dir("qwen2")), dtype="float32", quantization="bits:4", activation_bits=8,
              enable_prefix_caching=False, progress=False)
    assert "int8 activations" in llm.engine.runner.linear_method.name
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2)
    prompts = [[i + 3, 2 * i + 5, 11, 7 * i + 1] for i in range(40)]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0] for p in prompts[:3]]
    batch = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(alone, batch, strict=False):  # the quantized products are per row; the dense LM head's GEMM
        assert a.token_ids == b.outputs[0].token_ids  # blocks by batch size: fp32 rounding apart, no more
        for la, lb in zip(a.logprobs, b.outputs[0].logprobs, strict=True):
            assert la.keys() == lb.keys() and all(abs(la[t].logprob - lb[t].logprob) < 1e-5 for t in la)
    exact = LLM(str(model_dir("qwen2")), dtype="float32", quantization="bits:4", enable_prefix_caching=False,
                progress=False)
    e = exact.generate(prompts[:3], params, use_tqdm=False)
    # not exact: the first token's logprob moves, by what 8-bit activations move it
    diffs = [abs(next(iter(a.logprobs[0].values())).logprob - next(iter(b.outputs[0].logprobs[0].values())).logprob)
             for a, b in zip(alone, e, strict=True)]
    assert 0 < max(diffs) < 0.5
    with pytest.raises(InvalidRequestError, match="activation_bits needs a quantization"):
        LLM(str(model_dir("qwen2")), activation_bits=8, progress=False)
    with pytest.raises(InvalidRequestError, match="activation_bits must be 8"):
        LLM(str(model_dir("qwen2")), quantization="bits:4", activation_bits=4, progress=False)


@pytest.mark.parametrize("bits", range(1, 9))
def test_kernel_with_bf16_activations_equals_dequantize_then_matmul(kernels, bits):
    """bf16 x, as the bf16 engine multiplies: at 1-4 planes through the codes-and-dot-products kernels
    (csrc/bitplane_dp.h: 4 planes by nibbles and vpermw, 1-3 planes by bf16 words 2^-99 (8 + q) straight
    from the transpose; exact products, fp32 sums) where the build has them, and through the tables: all
    within 1e-5 of the fp64 product of the same bf16 values."""
    from tessera.cpu_features import cpu_flags

    assert kernels.bitplane_dp == ({"avx512_bf16", "avx512vbmi", "gfni", "avx512bw"} <= cpu_flags())
    g = torch.Generator().manual_seed(50 + bits)
    shapes = [(37, 100, 64), (16, 64, 16), (50, 300, 128), (33, 577, 32), (96, 576, 64)]
    before = kernels._set_bitplane_dp_min_bits(1)
    try:
        for dp_min in (1, 9):  # 9: the tables only
            kernels._set_bitplane_dp_min_bits(dp_min)
            for (n, k, group) in shapes:
                qw = quantize_weight(torch.randn(n, k, generator=g), QuantSpec(bits, group))
                tiles, scale, offset = tile_planes(qw.planes), tile_group_params(qw.scale), tile_group_params(qw.offset)
                bias = torch.randn(n, generator=g)
                for m in (1, 2, 5, 9):
                    x = torch.randn(m, k, generator=g).bfloat16()
                    want = (x.double() @ qw.dequantize().double().T) + bias.double()
                    out = torch.empty(m, n)
                    kernels.bitplane_linear(out, x, tiles, scale, offset, n, bias)
                    rel = float((out.double() - want).abs().max() / want.abs().max())
                    assert rel < 1e-5, (dp_min, n, k, group, m, rel)
    finally:
        kernels._set_bitplane_dp_min_bits(before)


def test_kernel_checks_its_inputs(kernels):
    qw = quantize_weight(torch.randn(20, 64), QuantSpec(4))
    tiles, scale, offset = tile_planes(qw.planes), tile_group_params(qw.scale), tile_group_params(qw.offset)
    with pytest.raises(RuntimeError, match="does not fit"):
        kernels.bitplane_linear(torch.empty(1, 40), torch.randn(1, 64), tiles, scale, offset, 40, None)
    with pytest.raises(RuntimeError, match="x must be"):
        kernels.bitplane_linear(torch.empty(1, 20), torch.randn(1, 65), tiles, scale, offset, 20, None)


def test_quantized_model_equals_its_dequantized_weights_dense(model_dir):
    """bits:4 through the kernels against the same model with each layer's dequantized weight loaded
    dense (fp32): same greedy tokens, logits within 1e-4 relative (only summation order differs)."""
    path = model_dir("llama")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    prompts = [[5, 17, 99, 3, 42], [7] * 20]
    q = LLM(str(path), dtype="float32", quantization="bits:4", quantization_group_size=32, progress=False)
    dense = LLM(str(path), dtype="float32", progress=False)
    qlayers = quantized_layers(q)
    assert qlayers and "lm_head" not in qlayers  # the LM head stays dense
    assert_agrees_with_dequantized_dense(q, dense, prompts, params)


def test_bad_quantization_is_refused_before_loading(model_dir):
    with pytest.raises(InvalidRequestError, match="bits:N"):
        LLM(str(model_dir("llama")), quantization="int4", progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2")], ids=["avx2", "portable"])
def test_narrower_isa_builds_equal_dequantize_then_matmul(extra):
    """The AVX2 and portable paths of the bit-plane kernel, built here with AVX-512 turned off."""
    from tessera.ops import cpu_kernels as ck

    module = ck.build(cflags=ck.CFLAGS + extra)
    assert module.isa == ("portable" if "-mno-avx2" in extra else "avx2") or module.isa == "portable"
    g = torch.Generator().manual_seed(7)
    for bits in (1, 3, 4, 8):
        qw = quantize_weight(torch.randn(37, 200, generator=g), QuantSpec(bits, 32))
        tiles, scale, offset = tile_planes(qw.planes), tile_group_params(qw.scale), tile_group_params(qw.offset)
        for m in (1, 2, 5):
            x = torch.randn(m, 200, generator=g)
            want = x.double() @ qw.dequantize().double().T
            out = torch.empty(m, 37)
            module.bitplane_linear(out, x, tiles, scale, offset, 37, None)
            assert float((out.double() - want).abs().max() / want.abs().max()) < 1e-5
    # int8 activations: every path computes the same integers and the same fp32 epilogue, so this build's
    # results equal the native build's (AVX512-VNNI where the CPU has it) bit for bit.
    native = ck.build()
    for bits in range(1, 9):
        for group in (16, 32, 64):
            qw = quantize_weight(torch.randn(37, 200, generator=g), QuantSpec(bits, group))
            tiles, scale, offset = tile_planes(qw.planes), tile_group_params(qw.scale), tile_group_params(qw.offset)
            x = torch.randn(11, 200, generator=g)
            out, want = torch.empty(11, 37), torch.empty(11, 37)
            module.bitplane_linear(out, x, tiles, scale, offset, 37, None, 8)
            native.bitplane_linear(want, x, tiles, scale, offset, 37, None, 8)
            assert torch.equal(out, want), (bits, group)


@pytest.mark.parametrize("bits", range(1, 9))
def test_dequantize_kernel_equals_dequantize_exactly(kernels, bits):
    g = torch.Generator().manual_seed(bits + 100)
    qw = quantize_weight(torch.randn(45, 200, generator=g), QuantSpec(bits, 32))
    tiles, scale, offset = tile_planes(qw.planes), tile_group_params(qw.scale), tile_group_params(qw.offset)
    want = qw.dequantize()
    # W^T, into a column slice of a wider buffer (the blockwise GEMM's), in every dtype.
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for row0, rows in [(0, 45), (16, 29), (32, 5)]:
            buf = torch.full((200, 50), -7.0, dtype=dtype)
            kernels.bitplane_dequantize_t(buf[:, :rows], tiles, scale, offset, row0)
            assert torch.equal(buf[:, :rows], want[row0:row0 + rows].T.to(dtype)), (dtype, row0)
            assert (buf[:, rows:] == -7).all()  # nothing written past the block
    with pytest.raises(RuntimeError, match="must start on a tile"):
        kernels.bitplane_dequantize_t(torch.empty(200, 4), tiles, scale, offset, 3)


def test_batched_rows_take_the_blockwise_gemm_and_agree():
    """From gemm_from_rows rows on, blocks of dequantized weight rows go through the GEMM; both paths
    equal dequantize-then-matmul in fp32 (1e-5 relative)."""
    from tessera.ops.linear import DENSE, Linear
    from tessera.quant.bits_linear import BitsLinearMethod

    layer = Linear(200, 77, bias=True)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    method = BitsLinearMethod(QuantSpec(3, 32), DENSE)
    method.block_weights = 16 * 200  # several blocks
    method.process_weights(layer)
    want_w = canonical(layer).dequantize().double()
    for rows in (1, method.gemm_from_rows - 1, method.gemm_from_rows, 100):
        x = torch.randn(rows, 200)
        want = x.double() @ want_w.T + layer.bias.double()
        got = method.apply(layer, x).double()
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5, rows


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_prefill_sized_bf16_rows_dequantize_the_layer_once_and_agree(bits):
    """From dense_from_rows rows of bf16 x on, the whole weight is dequantized (bf16) into a scratch buffer
    shared by the layers and multiplied by torch's GEMM: equal to round_bf16(dequantize()) @ x in fp64 within
    the output's bf16 rounding, for layers of several sizes in turn (the buffer grows, then is reused), with
    bias; a layer over scratch_max_weights keeps the batched kernel and agrees too."""
    from tessera.ops.linear import DENSE, Linear
    from tessera.quant.bits_linear import BitsLinearMethod

    g = torch.Generator().manual_seed(300 + bits)
    method = BitsLinearMethod(QuantSpec(bits, 64), DENSE)
    method.dense_from_rows = 40
    method.scratch_max_weights = 300 * 256
    layers = []
    for n, k in [(96, 128), (300, 256), (50, 64), (310, 256)]:  # the last is over scratch_max_weights
        layer = Linear(k, n, bias=True)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(n, k, generator=g))
            layer.bias.copy_(torch.randn(n, generator=g))
            layer.bias.data = layer.bias.data.bfloat16()
        method.process_weights(layer)
        layers.append(layer)
    for layer in layers + layers[:1]:
        w16 = canonical(layer).dequantize().bfloat16().double()
        for rows in (method.dense_from_rows - 1, method.dense_from_rows, 75):
            x = torch.randn(rows, layer.in_features, generator=g).bfloat16()
            want = x.double() @ w16.T + layer.bias.double()
            got = method.apply(layer, x)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, layer.out_features)
            rel = float((got.double() - want).abs().max() / want.abs().max())
            assert rel < 1e-2, (layer.out_features, rows, rel)
    assert method._scratch[torch.bfloat16].numel() == 300 * 256  # grown to the largest layer that fits, no more


def test_int8_activations_take_the_dense_path_at_prefill_sizes(kernels):
    """activation_bits=8 with bf16 x: below dense_from_rows rows the integer kernel (the same bits as calling
    it directly), from dense_from_rows on the dequantized weight and torch's GEMM (the same bits as the exact
    method's product there); fp32 x keeps the integer kernel at every size."""
    from tessera.ops.linear import DENSE, Linear
    from tessera.quant.bits_linear import BitsLinearMethod

    g = torch.Generator().manual_seed(310)
    a8 = BitsLinearMethod(QuantSpec(4, 64).with_activations(8), DENSE)
    exact = BitsLinearMethod(QuantSpec(4, 64), DENSE)
    layer = Linear(256, 96, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, 256, generator=g))
        layer.bias.copy_(torch.randn(96, generator=g))
    a8.process_weights(layer)
    for method in (a8, exact):
        method.dense_from_rows = 40
    tiles, scale, offset = layer.qtiles
    for dtype in (torch.bfloat16, torch.float32):
        layer.bias.data = layer.bias.data.to(dtype)
        for rows in (39, 40, 75):
            x = torch.randn(rows, 256, generator=g).to(dtype)
            int8 = torch.empty(rows, 96, dtype=dtype)
            kernels.bitplane_linear(int8, x, tiles, scale, offset, 96, layer.bias, 8)
            got = a8.apply(layer, x)
            if dtype == torch.bfloat16 and rows >= 40:
                assert torch.equal(got, exact.apply(layer, x)) and not torch.equal(got, int8), rows
            else:
                assert torch.equal(got, int8), (dtype, rows)


def test_quantized_lm_head_equals_its_dequantized_weight_dense(model_dir):
    """quantize_lm_head: the LM head's planes against its dequantized weight loaded dense (untied from the
    embeddings, which stay dense in both), same greedy tokens and logprobs within 1e-4."""
    path = model_dir("llama")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    prompts = [[5, 17, 99, 3, 42]]
    q = LLM(str(path), dtype="float32", quantization="bits:4", quantize_lm_head=True, progress=False)
    head = q.engine.model.lm_head
    assert head.qweight is not None and q.engine.model.embed_tokens.weight.numel() > 0
    dense = LLM(str(path), dtype="float32", progress=False)
    assert "lm_head" in quantized_layers(q)
    assert_agrees_with_dequantized_dense(q, dense, prompts, params)


def test_quantize_lm_head_needs_a_quantization(model_dir):
    with pytest.raises(InvalidRequestError, match="quantize_lm_head needs"):
        LLM(str(model_dir("llama")), quantize_lm_head=True, progress=False)



def test_bf16_rows_take_the_brgemm_path_from_a_few_rows_and_agree(kernels):
    """Where bitplane_gemm runs AMX brgemm, bf16 x takes it from brgemm_from_rows rows (fewer than the fp32
    threshold); fp32 x, and K that is not a whole number of tile columns, keep gemm_from_rows. Elsewhere bf16
    x takes the row count timed on this CPU. Either side of the threshold the product equals
    round_bf16(dequantize()) @ x within the output's bf16 rounding."""
    from tessera.ops.linear import DENSE, Linear
    from tessera.quant.bits_linear import BitsLinearMethod

    method = BitsLinearMethod(QuantSpec(4, 64), DENSE)
    assert method.brgemm_from_rows < method.gemm_from_rows
    g = torch.Generator().manual_seed(31)
    layers = {}
    for k in (128, 100):
        layer = Linear(k, 48)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(48, k, generator=g))
        layer.weight.data = layer.weight.data.bfloat16()
        method.process_weights(layer)
        layers[k] = layer
    brgemm = kernels._bitplane_gemm_uses_brgemm()
    # Without brgemm, bf16 x at 4 bits takes the crossover timed on this CPU (tessera.quant.kernel_choice).
    choice = tune_bitplane_kernels(kernels)
    timed = method.gemm_from_rows
    if choice.bf16_gemm_from_rows is not None and choice.dp_min_bits <= 4:
        timed = choice.bf16_gemm_from_rows
    assert method.gemm_rows(layers[128], torch.bfloat16, kernels) == (method.brgemm_from_rows if brgemm else timed)
    assert method.gemm_rows(layers[128], torch.float32, kernels) == method.gemm_from_rows
    assert method.gemm_rows(layers[100], torch.bfloat16, kernels) == (method.gemm_from_rows if brgemm else timed)
    w16 = canonical(layers[128]).dequantize().bfloat16().double()
    for rows in (method.brgemm_from_rows - 1, method.brgemm_from_rows, method.gemm_from_rows):
        x = torch.randn(rows, 128, generator=g).bfloat16()
        want = x.double() @ w16.T
        got = method.apply(layers[128], x).double()
        assert float((got - want).abs().max() / want.abs().max()) < 1e-2, rows

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_batched_bf16_rows_equal_dequantize_to_bf16_then_matmul(kernels, bits):
    """bitplane_gemm with bf16 x: where torch's brgemm runs AMX, 32-row blocks dequantized to bf16 in the VNNI
    layout and multiplied by cpublas::brgemm (csrc/bitplane_gemm.cpp); else the blockwise at::linear. Either
    multiplies round_bf16(dequantize()) by x with fp32 sums. The brgemm path keeps those sums in fp32 until
    the output: within 1e-5 of the fp64 product of the same bf16 values into fp32 out. bf16 out, and the
    blockwise path (its GEMM returns x's dtype, bf16), add one bf16 rounding of the output (1e-2). K not a
    multiple of 64 takes the blockwise path."""
    from tessera.cpu_features import cpu_flags

    brgemm = kernels._bitplane_gemm_uses_brgemm()
    if kernels.bitplane_dp and {"amx_bf16", "amx_tile"} <= cpu_flags():
        assert brgemm  # the AMX path must not silently fall back here
    g = torch.Generator().manual_seed(200 + bits)
    for (n, k, group) in [(37, 128, 64), (96, 576, 64), (50, 256, 32), (16, 64, 16), (40, 100, 32)]:
        qw = quantize_weight(torch.randn(n, k, generator=g), QuantSpec(bits, group))
        tiles, scale, offset = tile_planes(qw.planes), tile_group_params(qw.scale), tile_group_params(qw.offset)
        bias = torch.randn(n, generator=g).bfloat16()  # in x's dtype, as the engine's layers hold it
        w16 = qw.dequantize().bfloat16().double()
        for m in (16, 17, 32, 33, 70):
            x = torch.randn(m, k, generator=g).bfloat16()
            want = x.double() @ w16.T + bias.double()
            for dtype in (torch.float32, torch.bfloat16):
                tol = 1e-5 if dtype == torch.float32 and brgemm and k % 64 == 0 else 1e-2
                out = torch.empty(m, n, dtype=dtype)
                kernels.bitplane_gemm(out, x, tiles, scale, offset, n, bias, 1 << 20)
                rel = float((out.double() - want).abs().max() / want.abs().max())
                assert rel < tol, (n, k, group, m, dtype, rel)
