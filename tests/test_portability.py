"""What keeps tessera importable and running on CPUs outside Linux (macOS, Windows): no /proc, no
os.sysconf, no fcntl."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import torch


def test_available_memory_comes_from_psutil(monkeypatch):
    import psutil

    from tessera.config import available_memory_bytes

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=123 << 20, total=456 << 20))
    monkeypatch.delattr(os, "sysconf", raising=False)  # Windows has none
    real_open = builtins.open

    def no_proc(path, *args, **kwargs):  # nor has macOS /proc
        if str(path).startswith("/proc"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert available_memory_bytes(torch.device("cpu")) == 123 << 20


def test_conversion_lock_works_without_fcntl(tmp_path):
    """Without fcntl (Windows) the default-model module still imports, and two converters racing for
    the same GGUF still convert it once."""
    code = textwrap.dedent("""
        import json, sys, threading, time
        from pathlib import Path
        sys.modules["fcntl"] = None  # as on Windows: importing it fails
        import tessera.models.default_model as dm

        root = Path(sys.argv[1])
        src = root / "m.gguf"
        src.write_bytes(b"GGUF" + bytes(60))
        calls = []

        def convert(gguf, out, progress=True):
            calls.append(out)
            time.sleep(0.5)
            out.mkdir()
            for f in ("config.json", "model.safetensors"):
                (out / f).write_text("{}")
            marker = {"converter_version": dm.CONVERTER_VERSION, "source_size": gguf.stat().st_size}
            (out / dm.CONVERSION_MARKER).write_text(json.dumps(marker))
            return out

        dm.convert_gguf = convert
        results = []
        threads = [threading.Thread(target=lambda: results.append(dm.converted_gguf_dir(src, "m"))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [root / "cache" / "m"] * 2, results
        assert len(calls) == 1, calls
        print("ok")
    """)
    env = {**os.environ, "TESSERA_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")
