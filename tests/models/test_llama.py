"""The model against HF transformers (fp32): logits at every position, greedy tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, check_logits_at_every_position, load_hf, random_prompts

from tessera import LLM, SamplingParams

LENGTHS = [1, 7, 16, 17, 45, 130]  # 1 token; multiples of the block size (16) and not


@pytest.mark.parametrize("backend", ["cpu-kernels", "torch"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_hf_at_every_position(model_dir, arch, backend, monkeypatch):
    monkeypatch.setenv("TESSERA_ATTENTION_BACKEND", backend)
    path = model_dir(arch)
    llm = LLM(str(path), progress=False, max_num_batched_tokens=4096)
    assert llm.engine.runner.backend.name == backend
    check_logits_at_every_position(llm, load_hf(path), random_prompts(LENGTHS, seed=1))


@pytest.mark.parametrize("backend", ["cpu-kernels", "torch"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_matches_hf_for_mixed_length_batch(model_dir, arch, backend, monkeypatch):
    monkeypatch.setenv("TESSERA_ATTENTION_BACKEND", backend)
    path = model_dir(arch)
    llm = LLM(str(path), progress=False)
    hf = load_hf(path)
    prompts = random_prompts([1, 9, 16, 33, 70, 301], seed=2)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for p, out in zip(prompts, outs, strict=True):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)[0, len(p):].tolist()
        assert out.token_ids == ref
        assert out.finish_reason == "length"
