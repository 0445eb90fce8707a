"""tessera's C++ CPU kernels (tessera/ops/csrc), compiled once per machine at first use and cached.

The kernels are built with ``-march=native``, so a build is only valid on CPUs with the same
features: the build directory is ``$TESSERA_CACHE_DIR/kernels/<key>/`` where the key hashes the
sources, the compiler flags, the CPU's feature flags, torch's and Python's versions
(:func:`build_key`). A file lock keeps two processes from building the same key at once.

Set TESSERA_CPU_KERNELS=0 to use the pure-torch path; if the build fails, tessera logs why and falls
back to it, so a machine without a compiler still runs (more slowly).

The module's ops (all write into tensors the caller allocated; see each op's docstring):

- ``paged_decode_attention(out, q, k_cache, v_cache, block_tables, seq_lens, scale)``
- ``rms_norm(out, x, weight, eps)``
- ``fused_add_rms_norm(x, residual, weight, eps)``  (in place)
- ``silu_and_mul(out, x)``
- ``rotary_embedding(qk, positions, cos_sin, rotary_dim)``  (in place)
- ``reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)``
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# No -ffast-math: the elementwise kernels reproduce torch's float results bit for bit, which needs
# IEEE semantics and no contraction of a*b+c into one fma (-ffp-contract=off; the attention kernel
# calls fma explicitly). -fno-math-errno only lets sqrt compile to one instruction.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off")
LDFLAGS = ("-fopenmp",)


def source_files() -> list[Path]:
    """The .cpp files compiled into the module, then the headers they include (hashed, not compiled)."""
    return sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h"))


def cpu_features() -> str:
    """The CPU features ``-march=native`` depends on: the ``flags`` line of /proc/cpuinfo on Linux
    (``Features`` on ARM); elsewhere what ``platform`` knows of the processor."""
    from tessera.cpu_features import cpu_flags

    flags = cpu_flags()
    return " ".join(sorted(flags)) if flags else f"{platform.machine()} {platform.processor()}"


def torch_version() -> str:
    import torch

    return f"{torch.__version__} {getattr(torch.version, 'git_version', '')}"


def build_key(sources: Sequence[Path] | None = None, cflags: Sequence[str] = CFLAGS,
              ldflags: Sequence[str] = LDFLAGS, cpu_flags: str | None = None,
              torch_ver: str | None = None) -> str:
    """16 hex digits of sha256 over everything a build depends on: the sources' names and contents,
    the compiler and linker flags, the CPU features, torch's version, Python's version and the
    machine architecture. Any argument left out is this process's own."""
    h = hashlib.sha256()

    def put(tag: str, data: bytes) -> None:
        h.update(f"{tag}:{len(data)}:".encode())
        h.update(data)

    for path in source_files() if sources is None else sources:
        put("src " + Path(path).name, Path(path).read_bytes())
    put("cflags", " ".join(cflags).encode())
    put("ldflags", " ".join(ldflags).encode())
    put("cpu", (cpu_features() if cpu_flags is None else cpu_flags).encode())
    put("torch", (torch_version() if torch_ver is None else torch_ver).encode())
    put("python", f"{sys.implementation.name} {sys.version_info[0]}.{sys.version_info[1]}".encode())
    put("machine", platform.machine().encode())
    return h.hexdigest()[:16]


def kernels_root() -> Path:
    from tessera.models.default_model import cache_dir  # not at import: tessera.models imports tessera.ops

    return cache_dir() / "kernels"


def build(cflags: Sequence[str] = CFLAGS, ldflags: Sequence[str] = LDFLAGS, root: Path | None = None):
    """Load this machine's build of the module, building it first if there is none. Raises if the
    build fails. Returns the module."""
    import torch  # noqa: F401  (the module links against torch's libraries, which must be loaded)
    from filelock import FileLock

    key = build_key(cflags=cflags, ldflags=ldflags)
    name = f"tessera_cpu_kernels_{key}"
    build_dir = (root or kernels_root()) / key
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{name}{'.pyd' if sys.platform == 'win32' else '.so'}"
    with FileLock(str(build_dir / "build.lock")):
        if library.exists():
            try:
                return _import(name, library)
            except ImportError as e:  # e.g. a build killed while linking
                log.warning("the cached build %s does not load (%s); building it again", library, e)
                library.unlink()
        log.info("building tessera's CPU kernels once for this CPU (key %s, in %s)", key, build_dir)
        from torch.utils.cpp_extension import load

        # The `ninja` wheel puts its binary next to this interpreter; make sure the build finds it.
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        cpp = [str(p) for p in source_files() if p.suffix == ".cpp"]
        # torch's own build baton is a plain file that a killed build leaves behind, after which every
        # later build waits on it forever. Holding our (OS-released) lock, no other build is running here,
        # so a baton present now is stale.
        (build_dir / "lock").unlink(missing_ok=True)
        return load(name=name, sources=cpp, build_directory=str(build_dir), verbose=False,
                    extra_cflags=list(cflags), extra_ldflags=list(ldflags))


def _import(name: str, library: Path):
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def calibrate_sum_lanes(module) -> int:
    """Set the vector width whose summation order ``rms_norm`` reproduces to the one torch's sum
    kernel uses here (it depends on which of torch's CPU builds runs: AVX2, AVX-512, NEON...).
    Returns it; 0 if no candidate matched (rms_norm then agrees with torch to an ulp or so)."""
    import torch

    g = torch.Generator().manual_seed(1234)
    probes = [torch.randn(8, n, generator=g) * 3 for n in (1031, 4099, 5)]
    weights = [torch.randn(p.shape[1], generator=g) for p in probes]
    for lanes in (8, 16, 4, 32, 1):
        module._set_sum_lanes(lanes)
        ok = True
        for x, w in zip(probes, weights, strict=True):
            want = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
            got = torch.empty_like(x)
            module.rms_norm(got, x, w, 1e-6)
            ok = ok and torch.equal(got, want)
        if ok:
            return lanes
    module._set_sum_lanes(8)
    log.warning("tessera's rms_norm could not match torch's summation order on this machine; it will "
                "differ from torch's RMSNorm by about an ulp")
    return 0


@cache
def cpu_kernels():
    """The compiled module, or None when disabled or unbuildable."""
    if os.environ.get("TESSERA_CPU_KERNELS", "1") == "0":
        return None
    try:
        module = build()
        calibrate_sum_lanes(module)
    except Exception as e:  # compiler missing, headers missing, ...
        log.warning("tessera's CPU kernels could not be built (%s); using the torch fallback", e)
        return None
    return module
