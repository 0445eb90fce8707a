"""The engine must import and run with only what the GPU image has: no gguf, no server packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ["gguf", "fastapi", "uvicorn", "prometheus_client", "openai", "matplotlib"]


def test_engine_runs_without_server_or_gguf_packages(model_dir):
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError("blocked for this test: " + name)
        sys.meta_path.insert(0, Block())
        from tessera import LLM, SamplingParams
        llm = LLM({str(model_dir("llama"))!r}, progress=False)
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
        assert len(out[0].token_ids) == 3
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")
