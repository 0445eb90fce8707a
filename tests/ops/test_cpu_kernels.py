"""tessera's C++ elementwise CPU kernels against the torch op sequences they replace (bit for bit),
and the build cache's key."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from tessera.config import RopeConfig
from tessera.ops import cpu_kernels as ck
from tessera.ops.rope import apply_rope, cos_sin_cache

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---- the torch references (tessera/ops/norm.py, llama.py's MLP, rope.py) -------------------------
def rms_norm_ref(x, weight, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def silu_and_mul_ref(x):
    """On one thread: torch splits an op's elements among threads wherever, and a row cut
    mid-vector puts a few more elements through its scalar path (see below)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gate, up = x.split(x.shape[-1] // 2, dim=-1)
        return F.silu(gate) * up
    finally:
        torch.set_num_threads(threads)


def rope_ref(qk, positions, cos_sin, rotary_dim):
    cos, sin = cos_sin[positions].to(qk.dtype).unsqueeze(1).chunk(2, dim=-1)
    rot = apply_rope(qk[..., :rotary_dim], cos, sin)
    return torch.cat([rot, qk[..., rotary_dim:]], dim=-1)


def rand(*shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def assert_equal(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = got.float() != want.float()
    assert not diff.any(), f"{int(diff.sum())} of {diff.numel()} differ, max {(got.float() - want.float()).abs().max()}"


# ---- RMSNorm ----------------------------------------------------------------------------------
# The mean adds the squares in the order of torch's sum kernel (the vector width torch uses is
# found at load), so fp32 matches bit for bit too, not just to an ulp.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t,n", [(1, 512), (37, 576), (48, 512), (300, 64), (5, 4099), (3, 7), (2, 2048)])
def test_rms_norm_matches_torch(kernels, dtype, t, n):
    x = rand(t, n, dtype=dtype, seed=t * n)
    w = (rand(n, dtype=torch.float32, seed=n, scale=0.3) + 1).to(dtype)
    out = torch.empty_like(x)
    kernels.rms_norm(out, x, w, 1e-5)
    assert_equal(out, rms_norm_ref(x, w, 1e-5))


def test_rms_norm_strided_rows_and_fp32_weight(kernels):
    x = rand(40, 2, 576, dtype=torch.bfloat16, seed=3)[:, 1]  # rows 1152 elements apart
    w = rand(576, dtype=torch.float32, seed=4)
    out = torch.empty(40, 576)  # weight fp32 * x bf16 promotes to fp32
    kernels.rms_norm(out, x, w, 1e-6)
    assert_equal(out, rms_norm_ref(x, w, 1e-6))
    with pytest.raises(RuntimeError, match=r"out must be Float"):
        kernels.rms_norm(torch.empty(40, 576, dtype=torch.bfloat16), x, w, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_per_head_on_a_strided_slice(kernels, dtype):
    """Qwen3's q/k norms: [T, H, D] heads of the fused q/k tensor, normalised over D, no copy."""
    t, hq, hkv, d = 19, 8, 2, 128
    qkv = rand(t, (hq + 2 * hkv) * d, dtype=dtype, seed=9)
    q = qkv[:, : hq * d].view(t, hq, d)
    w = (rand(d, dtype=torch.float32, seed=10, scale=0.3) + 1).to(dtype)
    out = torch.empty(t, hq, d, dtype=dtype)
    kernels.rms_norm(out, q, w, 1e-6)
    assert_equal(out, rms_norm_ref(q, w, 1e-6))
    with pytest.raises(RuntimeError, match=r"out \[19, 4, 128\] must have x's shape \[19, 8, 128\]"):
        kernels.rms_norm(out[:, :4], q, w, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t,n", [(1, 512), (37, 576), (2048, 576), (3, 100)])
def test_fused_add_rms_norm_matches_torch(kernels, dtype, t, n):
    x = rand(t, n, dtype=dtype, seed=t + n)
    residual = rand(t, n, dtype=dtype, seed=t + n + 1)
    w = (rand(n, dtype=torch.float32, seed=n, scale=0.3) + 1).to(dtype)
    want_res = x + residual
    want_x = rms_norm_ref(want_res, w, 1e-5)
    kernels.fused_add_rms_norm(x, residual, w, 1e-5)
    assert_equal(residual, want_res)
    assert_equal(x, want_x)


# ---- SiLU and mul -----------------------------------------------------------------------------
# torch's silu runs Sleef's expf on whole vectors and glibc's expf on the rest of a row (under 32 or
# 64 elements here); the kernel uses Sleef's everywhere. With rows a multiple of 64 long every
# element of torch's goes through its vector path: bit for bit.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t,i", [(1, 1536), (37, 1536), (48, 192), (2048, 1536), (5, 64)])
def test_silu_and_mul_matches_torch(kernels, dtype, t, i):
    x = rand(t, 2 * i, dtype=dtype, seed=t * i)
    out = torch.empty(t, i, dtype=dtype)
    kernels.silu_and_mul(out, x)
    assert_equal(out, silu_and_mul_ref(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul_odd_rows(kernels, dtype):
    """Rows whose tails torch computes with glibc's expf: bf16 and fp16 still agree exactly; fp32 to
    an ulp of silu (two of the product), on a few percent of the tail elements (measured: 3.8% where
    every element is a tail)."""
    t, i = 301, 100
    x = rand(t, 2 * i, dtype=dtype, seed=11)
    out = torch.empty(t, i, dtype=dtype)
    kernels.silu_and_mul(out, x)
    want = silu_and_mul_ref(x)
    if dtype != torch.float32:
        assert_equal(out, want)
        return
    ulp = torch.finfo(torch.float32).eps * want.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert ((out - want).abs() <= 2 * ulp).all()
    assert (out != want).float().mean() < 0.05


# ---- RoPE -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t,hq,hkv,d,rotary_dim", [(37, 8, 2, 64, 64), (5, 4, 4, 128, 128), (9, 3, 1, 80, 80),
                                                    (13, 4, 1, 64, 32), (1, 2, 2, 80, 48)])
def test_rotary_embedding_matches_torch(kernels, dtype, t, hq, hkv, d, rotary_dim):
    rope = RopeConfig(theta=10000.0)
    table = cos_sin_cache(rope, rotary_dim, 4096)
    # q and k inside the fused qkv output, as the model has them: the token stride covers v too.
    qkv = rand(t, (hq + 2 * hkv) * d, dtype=dtype, seed=t * d)
    qk = qkv[:, : (hq + hkv) * d].view(t, hq + hkv, d)
    v_before = qkv[:, (hq + hkv) * d:].clone()
    positions = torch.randint(0, 4096, (t,), generator=torch.Generator().manual_seed(t))
    want = rope_ref(qk, positions, table, rotary_dim)
    kernels.rotary_embedding(qk, positions, table, rotary_dim)
    assert_equal(qk, want)
    assert torch.equal(qkv[:, (hq + hkv) * d:], v_before)


def test_rotary_embedding_checks_inputs(kernels):
    qk = torch.randn(4, 3, 64)
    table = cos_sin_cache(RopeConfig(), 64, 100)
    with pytest.raises(RuntimeError, match=r"positions\[2\] = 100 is outside the table \[0, 100\)"):
        kernels.rotary_embedding(qk, torch.tensor([0, 1, 100, 3]), table, 64)
    with pytest.raises(RuntimeError, match=r"cos_sin must be a contiguous float32 \[max_positions, rotary_dim = 32\]"):
        kernels.rotary_embedding(qk, torch.arange(4), table, 32)
    with pytest.raises(RuntimeError, match=r"heads must be contiguous rows"):
        kernels.rotary_embedding(qk.transpose(0, 1).contiguous().transpose(0, 1), torch.arange(4), table, 64)


# ---- KV cache write ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reshape_and_cache_matches_index_copy(kernels, dtype):
    from tessera.ops.attention import write_kv

    t, hq, hkv, d, nblocks, bs = 23, 4, 2, 80, 9, 16
    qkv = rand(t, (hq + 2 * hkv) * d, dtype=dtype, seed=5)
    k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(t, hkv, d)
    slots = torch.randperm(nblocks * bs, generator=torch.Generator().manual_seed(6))[:t]
    kc, vc = torch.zeros(nblocks, bs, hkv, d, dtype=dtype), torch.zeros(nblocks, bs, hkv, d, dtype=dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    kernels.reshape_and_cache(k, v, kc, vc, slots)
    write_kv(k.contiguous(), v.contiguous(), kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    bad = slots.clone()
    bad[7] = nblocks * bs
    with pytest.raises(RuntimeError, match=r"slot_mapping\[7\] = 144 is not a slot of the cache"):
        kernels.reshape_and_cache(k, v, kc, vc, bad)


# ---- input checks -----------------------------------------------------------------------------
def test_elementwise_checks_inputs(kernels):
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match=r"x must be \[num_tokens, 32\] or \[num_tokens, num_heads, 32\]"):
        kernels.rms_norm(torch.empty(4, 32), x, torch.ones(32), 1e-5)
    with pytest.raises(RuntimeError, match=r"x, residual and weight must share one dtype"):
        kernels.fused_add_rms_norm(x, x.bfloat16(), torch.ones(64), 1e-5)
    with pytest.raises(RuntimeError, match=r"out is BFloat16 but x is Float"):
        kernels.silu_and_mul(torch.empty(4, 32, dtype=torch.bfloat16), x)
    with pytest.raises(RuntimeError, match=r"x must be contiguous along its last dim"):
        kernels.silu_and_mul(torch.empty(4, 32), torch.randn(64, 4).t())
    with pytest.raises(RuntimeError, match=r"must be a CPU tensor"):
        kernels.rms_norm(torch.empty(4, 64, device="meta"), x, torch.ones(64), 1e-5)


# ---- the build cache --------------------------------------------------------------------------
AVX2 = "avx avx2 f16c fma sse4_2"
AVX512 = AVX2 + " avx512bw avx512f avx512vl"


def test_build_key_changes_with_cpu_flags():
    base = ck.build_key(cpu_flags=AVX2, torch_ver="2.13.0")
    assert ck.build_key(cpu_flags=AVX2, torch_ver="2.13.0") == base  # deterministic
    assert ck.build_key(cpu_flags=AVX512, torch_ver="2.13.0") != base  # an AVX-512 build is not reused on AVX2
    assert ck.build_key(cpu_flags=AVX512 + " avx512_bf16", torch_ver="2.13.0") != ck.build_key(
        cpu_flags=AVX512, torch_ver="2.13.0")
    assert ck.build_key(cpu_flags=AVX2, torch_ver="2.12.0") != base
    assert ck.build_key(cpu_flags=AVX2, torch_ver="2.13.0", cflags=ck.CFLAGS + ("-g",)) != base
    assert len(base) == 16 and int(base, 16) >= 0


def test_build_key_changes_with_sources(tmp_path):
    src = tmp_path / "kernel.cpp"
    src.write_text("int f() { return 1; }\n")
    one = ck.build_key(sources=[src], cpu_flags=AVX2, torch_ver="x")
    src.write_text("int f() { return 2; }\n")
    assert ck.build_key(sources=[src], cpu_flags=AVX2, torch_ver="x") != one


def test_cpu_features_are_this_machines():
    from tessera.cpu_features import cpu_flags

    features = ck.cpu_features()
    assert features and (not cpu_flags() or set(features.split()) == set(cpu_flags()))


def test_module_is_built_in_the_cache_under_its_key(kernels):
    from pathlib import Path

    key = ck.build_key()
    library = Path(kernels.__file__)
    assert library.parent.name == key and library.parent.parent.name == "kernels"
    assert library.name.startswith(f"tessera_cpu_kernels_{key}")
    assert kernels.isa in ("avx512", "avx2", "portable")


def _stub_kernel_sources(tmp_path, monkeypatch, answer: int) -> None:
    """Point the build at a one-function stub module and an empty cache under tmp_path."""
    stub = tmp_path / "src"
    stub.mkdir()
    (stub / "stub.cpp").write_text(
        "#include <pybind11/pybind11.h>\n"
        f"int64_t answer() {{ return {answer}; }}\n"
        "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def(\"answer\", &answer); }\n")
    monkeypatch.setattr(ck, "CSRC", stub)
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))


def test_build_into_an_empty_cache_then_load_it(tmp_path, monkeypatch, caplog):
    """A fresh cache root builds (logging that it does) and the second call loads the same library.
    The kernel sources are a stub here: the real build is what the other tests use."""
    _stub_kernel_sources(tmp_path, monkeypatch, answer=42)
    with caplog.at_level("INFO", logger=ck.log.name):
        module = ck.build(cflags=("-O0",), ldflags=())
    assert module.answer() == 42
    assert "once for this CPU" in caplog.text
    key = ck.build_key(cflags=("-O0",), ldflags=())
    assert (tmp_path / "cache" / "kernels" / key).is_dir()
    caplog.clear()
    with caplog.at_level("INFO", logger=ck.log.name):
        again = ck.build(cflags=("-O0",), ldflags=())
    assert again.answer() == 42 and "once for this CPU" not in caplog.text


def test_build_is_not_stopped_by_a_killed_builds_baton(tmp_path, monkeypatch):
    """torch's build baton (a plain `lock` file) survives a build killed midway; the next build must
    not wait on it forever (it holds tessera's own lock, so no other build is running)."""
    _stub_kernel_sources(tmp_path, monkeypatch, answer=7)
    key = ck.build_key(cflags=("-O0",), ldflags=())
    build_dir = tmp_path / "cache" / "kernels" / key
    build_dir.mkdir(parents=True)
    (build_dir / "lock").write_text("")  # what a killed build leaves
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("m", ck.build(cflags=("-O0",), ldflags=())),
                              daemon=True)
    worker.start()
    worker.join(timeout=300)
    assert not worker.is_alive(), "the build waited on a stale baton"
    assert result["m"].answer() == 7


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("TESSERA_CPU_KERNELS", "0")
    ck.cpu_kernels.cache_clear()
    try:
        assert ck.cpu_kernels() is None
    finally:
        monkeypatch.delenv("TESSERA_CPU_KERNELS")
        ck.cpu_kernels.cache_clear()


# ---- the other instruction sets ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("extra", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2")], ids=["avx2", "portable"])
def test_narrower_isa_builds_agree(extra):
    """The AVX2 and portable code paths, built on this machine with AVX-512 turned off, give the
    same elementwise results bit for bit and the same attention to fp32 rounding."""
    module = ck.build(cflags=ck.CFLAGS + extra)
    ck.calibrate_sum_lanes(module)
    if "-mno-avx2" in extra:
        assert module.isa == "portable"
    else:
        assert module.isa in ("avx2", "portable")  # portable on x86 CPUs without F16C/FMA
    for dtype in DTYPES:
        x = rand(37, 2 * 200, dtype=dtype, seed=1)
        out = torch.empty(37, 200, dtype=dtype)
        module.silu_and_mul(out, x)
        ref = torch.empty_like(out)
        ck.cpu_kernels().silu_and_mul(ref, x)
        assert_equal(out, ref)
        x = rand(37, 579, dtype=dtype, seed=2)
        w = rand(579, dtype=dtype, seed=3)
        out = torch.empty_like(x)
        module.rms_norm(out, x, w, 1e-5)
        assert_equal(out, rms_norm_ref(x, w, 1e-5))
        qk = rand(7, 5, 80, dtype=dtype, seed=4)
        table = cos_sin_cache(RopeConfig(), 80, 64)
        pos = torch.arange(7) * 9
        want = rope_ref(qk, pos, table, 80)
        module.rotary_embedding(qk, pos, table, 80)
        assert_equal(qk, want)
        # attention: 3 sequences, GQA 4, head_dim 64 and 80
        for d in (64, 80):
            q = rand(3, 8, d, dtype=dtype, seed=5, scale=1)
            kc, vc = rand(20, 16, 2, d, dtype=dtype, seed=6, scale=1), rand(20, 16, 2, d, dtype=dtype, seed=7, scale=1)
            bt = torch.randperm(20, generator=torch.Generator().manual_seed(8))[:18].view(3, 6)
            lens = torch.tensor([1, 50, 96])
            got, want = torch.empty_like(q), torch.empty_like(q)
            module.paged_decode_attention(got, q, kc, vc, bt, lens, d**-0.5)
            ck.cpu_kernels().paged_decode_attention(want, q, kc, vc, bt, lens, d**-0.5)
            tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
            assert ((got.float() - want.float()).abs() <= tol * (1 + want.float().abs())).all()
