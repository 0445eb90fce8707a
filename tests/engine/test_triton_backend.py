"""The GPU code path (Triton attention, fused RoPE + cache write, fused RMSNorm) end to end.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TESSERA_ATTENTION_BACKEND=triton,
TRITON_INTERPRET=1 from conftest): slow, so the models and runs are tiny. On a GPU the same test runs
the compiled kernels."""

from __future__ import annotations

import pytest
import torch
import triton  # noqa: E402, F401  (a dev dependency: the suite fails loudly without it)
from conftest import random_prompts

from tessera import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_path_matches_torch_path(model_dir, arch, monkeypatch):
    prompts = random_prompts([1, 7, 20, 35], seed=12)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(progress=False, max_num_batched_tokens=24, dtype="float32")  # chunked prefill
    monkeypatch.setenv("TESSERA_ATTENTION_BACKEND", "torch")  # the CPU path: the reference
    ref = LLM(str(model_dir(arch)), device="cpu", **kw)
    want = [o.token_ids for o in ref.generate(prompts, GREEDY, use_tqdm=False)]
    monkeypatch.setenv("TESSERA_ATTENTION_BACKEND", "triton")
    tri = LLM(str(model_dir(arch)), device=device, **kw)
    assert tri.engine.runner.backend.name == "triton"
    got = [o.token_ids for o in tri.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == want
    assert tri.engine.block_manager.num_used_blocks == 0
