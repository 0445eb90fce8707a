"""The model against HF transformers (fp32): logits at every position, greedy tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, load_hf, random_prompts

from tessera import LLM, SamplingParams
from tessera.engine.scheduler import ScheduledSeq
from tessera.engine.sequence import Sequence

LENGTHS = [1, 7, 16, 17, 45, 130]  # 1 token; multiples of the block size (16) and not


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("backend", ["cpu-kernels", "torch"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_hf_at_every_position(model_dir, arch, backend, monkeypatch):
    monkeypatch.setenv("TESSERA_ATTENTION_BACKEND", backend)
    path = model_dir(arch)
    llm = LLM(str(path), progress=False, max_num_batched_tokens=4096)
    assert llm.engine.runner.backend.name == backend
    hf = load_hf(path)
    prompts = random_prompts(LENGTHS, seed=1)
    engine = llm.engine
    # One flat batch holding every prompt, prefilled together.
    seqs = [Sequence(i, f"r{i}", 0, p, SamplingParams()) for i, p in enumerate(prompts)]
    batch = []
    for s in seqs:
        engine.block_manager.allocate(s, s.num_tokens)
        batch.append(ScheduledSeq(s, s.num_tokens))
    # Single-token prompts count as decodes and come first in the flat batch.
    order = [s for s in batch if s.num_new_tokens == 1] + [s for s in batch if s.num_new_tokens > 1]
    logits = engine.runner.run(batch, all_rows=True)
    row = 0
    for item in order:
        ref = hf(torch.tensor([item.seq.token_ids])).logits[0]
        got = logits[row:row + item.num_new_tokens]
        row += item.num_new_tokens
        assert rel_err(got, ref) < 1e-4, (arch, item.num_new_tokens)
    for s in seqs:
        engine.block_manager.free_seq(s)
    assert engine.block_manager.num_used_blocks == 0


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
