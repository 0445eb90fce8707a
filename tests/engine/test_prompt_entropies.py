"""SamplingParams.prompt_entropies: the next-token entropy at the last N prompt positions equals HF's,
whatever the chunking, and the prefix cache never skips a position whose entropy is wanted."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_hf, random_prompts

from tessera import LLM, SamplingParams

N = 12


def hf_entropies(hf, prompt: list[int], n: int) -> list[float]:
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -n:].float()
    logp = torch.log_softmax(logits, dim=-1)
    return (-(logp.exp() * logp).sum(-1)).tolist()


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=16, block_size=4)], ids=["whole", "chunked"])
def test_prompt_entropies_match_hf(model_dir, kw):
    path = model_dir("qwen3")
    prompts = random_prompts([40, 7, 90], seed=5)
    # The same prompt twice: the second finds the first's blocks cached, yet must score its tail.
    prompts.append(list(prompts[0]))
    llm = LLM(str(path), progress=False, **kw)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_entropies=N)
    outs = llm.generate(prompts[:1], params, use_tqdm=False) + llm.generate(prompts[1:], params, use_tqdm=False)
    hf = load_hf(path)
    for prompt, out in zip(prompts, outs, strict=True):
        n = min(N, len(prompt))
        assert len(out.prompt_entropies) == n and not any(math.isnan(e) for e in out.prompt_entropies)
        torch.testing.assert_close(torch.tensor(out.prompt_entropies), torch.tensor(hf_entropies(hf, prompt, n)),
                                   rtol=1e-4, atol=1e-4)
    assert outs[3].metrics["num_cached_tokens"] > 0  # the prefix cache did serve the repeat
    assert llm.engine.block_manager.num_used_blocks == 0


def test_no_entropies_unless_asked(model_dir):
    llm = LLM(str(model_dir("llama")), progress=False)
    out = llm.generate(random_prompts([20])[0], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert out.prompt_entropies is None
