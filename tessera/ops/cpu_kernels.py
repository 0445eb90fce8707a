"""tessera's C++ CPU kernels, compiled once at first use (torch.utils.cpp_extension) and cached.

Set TESSERA_CPU_KERNELS=0 to use the pure-torch path; if the build fails, tessera logs why and falls
back to it, so a machine without a compiler still runs (more slowly)."""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)
_SRC = Path(__file__).parent / "csrc" / "paged_attention.cpp"


@cache
def cpu_kernels():
    """The compiled module, or None when disabled or unbuildable."""
    if os.environ.get("TESSERA_CPU_KERNELS", "1") == "0":
        return None
    try:
        import sys

        from torch.utils.cpp_extension import load

        # The `ninja` wheel puts its binary next to this interpreter; make sure the build finds it.
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

        log.info("building tessera's CPU attention kernel (once per machine, cached)")
        return load(name="tessera_cpu_kernels", sources=[str(_SRC)], verbose=False,
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
                    extra_ldflags=["-fopenmp"])
    except Exception as e:  # compiler missing, headers missing, ...
        log.warning("tessera's CPU kernels could not be built (%s); using the torch fallback", e)
        return None
