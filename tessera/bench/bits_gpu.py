"""`tessera bench bits-gpu`: the Triton bit-plane kernels' decode bandwidth on a CUDA GPU.

For each layer shape and width N it times out = x @ W^T at `--rows` rows (default 1: the decode GEMV)
in bf16 and reports the bytes the kernel must read (plane words + fp32 scales and offsets + x + out)
per second, next to the device's copy bandwidth (a 1 GiB tensor copied, read + write bytes / time).
At 4 bits the same shapes also go through torch's int4 kernel (`aten._weight_int4pack_mm`, group
sizes 64 and 128, tinygemm's layout; ours runs at group 128 too), and every case checks its output
against a dequantized reference so that a wrong layout cannot post a fast time. Timings are
triton.testing.do_bench medians, which flush the L2 cache before each call (a 4096 x 4096 layer at
4 bits fits in an H100's L2).

Weights are random codes made on the GPU (quantizing real weights is not what is measured).
Without a CUDA device the bench stops with a message; it is never a timed test.
"""

from __future__ import annotations

import functools

# (N out, K in): Llama-3-8B's projections (qkv, o, gate+up, down).
DEFAULT_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


def add_bits_gpu_args(sub) -> None:
    p = sub.add_parser("bits-gpu", help="bit-plane Triton kernels: decode bandwidth per width on a CUDA GPU")
    p.add_argument("--bits", type=int, nargs="+", default=list(range(1, 9)), help="widths (default 1..8)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="NxK",
                   help="layer shapes out x in (default Llama-3-8B's: 6144x4096 4096x4096 28672x4096 4096x14336)")
    p.add_argument("--rows", type=int, nargs="+", default=[1], help="rows of x (default 1: decode)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=100, help="do_bench milliseconds of repetitions")
    p.add_argument("--json-out", default=None)


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("tessera bench bits-gpu needs a CUDA GPU, and torch sees none "
                         "(torch.cuda.is_available() is False); the CPU kernels are benched by `tessera bench latency`")


def _time_ms(fn, reps: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=max(5, reps // 4), rep=reps, return_mode="median"))


def _copy_gbps(reps: int) -> float:
    import torch

    src = torch.empty(1 << 29, dtype=torch.int16, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _random_planes(n: int, k: int, bits: int, group: int, gen, device: str = "cuda"):
    """A GpuBitPlanes of random codes, and its dequantized weight [n, k] in fp32, made on `device`."""
    import torch

    from tessera.ops.triton.bitplane_linear import GpuBitPlanes

    kp = -(-k // max(64, group)) * max(64, group)
    words = torch.randint(-(1 << 31), 1 << 31, (bits, kp // 32, n), dtype=torch.int64, device=device,
                          generator=gen).to(torch.int32)
    scale = torch.rand(kp // group, n, device=device, generator=gen) * 0.02 + 1e-3
    offset = -scale * ((1 << bits) - 1) / 2
    w = GpuBitPlanes(words, scale, offset, bits, group, k)
    shifts = torch.arange(32, device=device, dtype=torch.int32)
    codes = torch.zeros(kp // 32, n, 32, dtype=torch.int32, device=device)
    for i in range(bits):
        codes |= ((words[i][..., None] >> shifts) & 1) << i
    codes = codes.permute(1, 0, 2).reshape(n, kp).float()
    dense = (codes.view(n, -1, group) * scale.t()[..., None] + offset.t()[..., None]).view(n, kp)[:, :k]
    return w, dense


def _int4pack(codes, scale, zero):
    """torch's tinygemm int4 layout for codes [n, k] in [0, 16): (packed, scales_and_zeros)."""
    import torch

    inner_k_tiles = 8
    try:  # torch >= 2.5: uint8 [n, k / 2], two codes a byte (even k in the high nibble)
        packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8),
                                                           inner_k_tiles)
    except RuntimeError:  # older torch: int32 [n, k]
        packed = torch.ops.aten._convert_weight_to_int4pack(codes.to(torch.int32), inner_k_tiles)
    # dequantized: (q - 8) * scale + zero, scales_and_zeros [k / group, n, 2] bf16
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def bench_bits_gpu(shapes=None, bits_list=None, rows=(1,), group: int = 64, reps: int = 100) -> dict:
    _require_cuda()
    import torch

    from tessera.ops.triton.bitplane_linear import bitplane_linear

    shapes = shapes or DEFAULT_SHAPES
    bits_list = bits_list or list(range(1, 9))
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy = _copy_gbps(reps)
    cases = []

    def row(system, bits, n, k, m, g, ms, nbytes, out, want):
        err = float((out.double() - want).abs().max() / want.abs().max())
        cases.append(dict(system=system, bits=bits, n=n, k=k, rows=m, group=g, us=round(ms * 1e3, 2),
                          bytes=nbytes, gbps=round(nbytes / ms / 1e6, 1), of_copy=round(nbytes / ms / 1e6 / copy, 3),
                          max_rel_err=err))

    for n, k in shapes:
        for bits in bits_list:
            # at 4 bits also at group 128, the int4 kernel's other group size
            for g in [group] + ([128] if bits == 4 and group != 128 else []):
                w, dense = _random_planes(n, k, bits, g, gen)
                for m in rows:
                    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
                    want = x.double() @ dense.double().t()  # the codes and fp32 scales are used exactly
                    ms = _time_ms(functools.partial(bitplane_linear, x, w), reps)
                    nbytes = w.nbytes + 2 * m * (k + n)
                    row("tessera-triton", bits, n, k, m, g, ms, nbytes, bitplane_linear(x, w), want)
                del w, dense
        if 4 not in bits_list:
            continue
        for g in (64, 128):  # torch's int4 kernel on the same shapes
            codes = torch.randint(0, 16, (n, k), device="cuda", generator=gen, dtype=torch.int32)
            scale = torch.rand(n, k // g, device="cuda", generator=gen) * 0.02 + 1e-3
            zero = torch.zeros_like(scale)
            try:
                packed, sz = _int4pack(codes, scale, zero)
            except RuntimeError as e:
                cases.append(dict(system="torch-int4pack", bits=4, n=n, k=k, group=g, error=str(e)[:200]))
                continue
            s_b, z_b = sz[..., 0].t().float(), sz[..., 1].t().float()
            dense = ((codes - 8).float().view(n, -1, g) * s_b[..., None] + z_b[..., None]).view(n, k)
            for m in rows:
                x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
                fn = functools.partial(torch.ops.aten._weight_int4pack_mm, x, packed, g, sz)
                ms = _time_ms(fn, reps)
                nbytes = packed.numel() * packed.element_size() + sz.numel() * 2 + 2 * m * (k + n)
                # tinygemm dequantizes to bf16: its reference is the bf16-rounded weight
                row("torch-int4pack", 4, n, k, m, g, ms, nbytes, fn(), x.double() @ dense.bfloat16().double().t())
    return {
        "bench": "bits-gpu",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_gbps": round(copy, 1),
        "dtype": "bfloat16",
        "note": "gbps = bytes the kernel must read and write / median time (L2 flushed); of_copy = gbps / copy_gbps",
        "cases": cases,
    }


def run_bits_gpu(args) -> dict:
    _require_cuda()
    shapes = None
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        except ValueError:
            raise SystemExit(f"--shapes takes NxK pairs, got {args.shapes}") from None
    return bench_bits_gpu(shapes, args.bits, args.rows, args.group_size, args.reps)
