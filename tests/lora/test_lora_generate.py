"""Multi-LoRA end to end: each adapter's greedy fp32 output equals PEFT's merged model (HF generate),
alone, in one batch mixing adapters and the base model, with fewer slots than adapters (LRU swaps),
and with the prefix cache on (identical prompts on different adapters share no KV)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_hf, load_hf_merged, random_prompts

from tessera import LLM, InvalidRequestError, LoRARequest, ModelLoadError, SamplingParams

N_NEW = 8
GREEDY = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, logprobs=1)
LENGTHS = [5, 23, 40]


def hf_greedy(model, prompts):
    """Greedy tokens and each chosen token's logprob, one prompt at a time."""
    out = []
    for p in prompts:
        with torch.no_grad():
            g = model.generate(torch.tensor([p]), max_new_tokens=N_NEW, do_sample=False, output_scores=True,
                               return_dict_in_generate=True)
        toks = g.sequences[0, len(p):].tolist()
        lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(g.scores, toks, strict=True)]
        out.append((toks, lps))
    return out


def tessera_result(o):
    c = o.outputs[0]
    return c.token_ids, [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]


def assert_same(got, want):
    for (gt, gl), (wt, wl) in zip(got, want, strict=True):
        assert gt == wt
        for a, b in zip(gl, wl, strict=True):
            assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4), (a, b)


@pytest.fixture(scope="module")
def llama_refs(model_dir, lora_dir):
    """4 llama adapters (different ranks, targets, rsLoRA) and their merged-model references."""
    base = model_dir("llama")
    kinds = [dict(r=4), dict(r=8, alpha=16.0, targets=("q_proj", "v_proj")),
             dict(r=2, targets=("o_proj", "down_proj", "up_proj"), use_rslora=True), dict(r=16, alpha=4.0)]
    adapters = [lora_dir("llama", seed=i + 1, **kw) for i, kw in enumerate(kinds)]
    prompts = random_prompts(LENGTHS, seed=3)
    refs = [hf_greedy(load_hf_merged(base, a), prompts) for a in adapters]
    base_ref = hf_greedy(load_hf(base), prompts)
    reqs = [LoRARequest(f"a{i}", i + 1, str(a)) for i, a in enumerate(adapters)]
    return base, prompts, reqs, refs, base_ref


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_adapter_equals_merged_peft_model(model_dir, lora_dir, arch):
    base = model_dir(arch)
    adapter = lora_dir(arch, seed=5, r=8, alpha=12.0)
    prompts = random_prompts(LENGTHS, seed=4)
    want = hf_greedy(load_hf_merged(base, adapter), prompts)
    llm = LLM(str(base), progress=False, enable_lora=True, max_lora_rank=8)
    got = [tessera_result(o) for o in llm.generate(prompts, GREEDY, use_tqdm=False,
                                                   lora_request=LoRARequest("x", 1, str(adapter)))]
    assert_same(got, want)
    assert got != [tessera_result(o) for o in llm.generate(prompts, GREEDY, use_tqdm=False)]  # it did something


def test_each_adapter_alone_and_mixed_in_one_batch(llama_refs):
    base, prompts, reqs, refs, base_ref = llama_refs
    llm = LLM(str(base), progress=False, enable_lora=True, max_loras=4, max_lora_rank=16)
    for req, want in zip(reqs, refs, strict=True):
        assert_same([tessera_result(o) for o in llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=req)],
                    want)
    # One batch: every prompt on every adapter and on the base model, interleaved.
    mixed = [(p, k) for p in range(len(prompts)) for k in range(len(reqs) + 1)]
    outs = llm.generate([prompts[p] for p, _ in mixed], GREEDY, use_tqdm=False,
                        lora_request=[reqs[k] if k < len(reqs) else None for _, k in mixed])
    for (p, k), o in zip(mixed, outs, strict=True):
        want = refs[k][p] if k < len(reqs) else base_ref[p]
        assert_same([tessera_result(o)], [want])
    assert llm.engine.block_manager.num_used_blocks == 0


def test_fewer_slots_than_adapters_swaps_lru(llama_refs):
    base, prompts, reqs, refs, base_ref = llama_refs
    # FCFS in input order (offline planning would group each adapter's requests together).
    llm = LLM(str(base), progress=False, enable_lora=True, max_loras=2, max_lora_rank=16, max_num_seqs=3,
              prefix_planning="off")
    order = [0, 1, 2, 3, 2, 0, 1, 3, 3, 0]
    outs = llm.generate([prompts[i % len(prompts)] for i in range(len(order))], GREEDY, use_tqdm=False,
                        lora_request=[reqs[k] for k in order])
    for i, (k, o) in enumerate(zip(order, outs, strict=True)):
        assert_same([tessera_result(o)], [refs[k][i % len(prompts)]])
    assert llm.engine.lora.swaps > 4  # adapters went in and out of the 2 slots


def test_prefix_cache_never_shares_across_adapters(llama_refs):
    base, prompts, reqs, refs, base_ref = llama_refs
    llm = LLM(str(base), progress=False, enable_lora=True, block_size=4, enable_prefix_caching=True)
    p = prompts[2]  # 40 tokens: 9 full blocks to share if the cache allowed it
    for _ in range(2):  # the second round finds every block cached, each under its own adapter
        outs = llm.generate([p] * 5, GREEDY, use_tqdm=False, lora_request=[*reqs, None])
        for k, o in enumerate(outs):
            assert_same([tessera_result(o)], [refs[k][2] if k < len(reqs) else base_ref[2]])
    bm = llm.engine.block_manager
    assert 0 < bm.prefix_hit_rate < 1


def test_bad_lora_requests(llama_refs, model_dir):
    base, prompts, reqs, _, _ = llama_refs
    plain = LLM(str(base), progress=False)
    with pytest.raises(InvalidRequestError, match="enable_lora"):
        plain.generate(prompts, GREEDY, use_tqdm=False, lora_request=reqs[0])
    llm = LLM(str(base), progress=False, enable_lora=True, max_lora_rank=16)
    with pytest.raises(InvalidRequestError, match="2 LoRA requests for 3 prompts"):
        llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=reqs[:2])
    llm.generate(prompts[:1], GREEDY, use_tqdm=False, lora_request=reqs[0])
    with pytest.raises(InvalidRequestError, match="already adapter 'a0'"):
        llm.generate(prompts[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest("other", 1, str(reqs[1].lora_path)))
    with pytest.raises(InvalidRequestError, match="lora_int_id must be a positive integer"):
        LoRARequest("x", 0, "/tmp")
    with pytest.raises(ModelLoadError, match="prompt 0: .*no such directory"):
        llm.generate(prompts[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest("gone", 9, "/nonexistent/adapter"))
    # Nothing was left behind, and the engine still serves.
    assert llm.engine.block_manager.num_used_blocks == 0 and not llm.engine.requests
    assert len(llm.generate(prompts[:1], GREEDY, use_tqdm=False, lora_request=reqs[0])[0].outputs[0].token_ids) == N_NEW


def test_adapter_whose_files_vanished_fails_only_its_requests(llama_refs, tmp_path):
    """An adapter registered while its files existed, pushed out of host memory, then deleted: its reload
    fails when its request is scheduled. That request finishes with "error" naming the adapter; the base
    and the other adapter's requests in the same steps carry on, and every KV block comes back."""
    import shutil

    base, prompts, reqs, refs, base_ref = llama_refs
    gone = LoRARequest("gone", 77, str(shutil.copytree(reqs[0].lora_path, tmp_path / "gone")))
    llm = LLM(str(base), progress=False, enable_lora=True, max_loras=2, max_cpu_loras=2, max_lora_rank=16)
    eng = llm.engine
    rid_gone = eng.add_request(None, GREEDY, prompt_token_ids=prompts[0], lora_request=gone)
    rid_base = eng.add_request(None, GREEDY, prompt_token_ids=prompts[1])
    rid_other = [eng.add_request(None, GREEDY, prompt_token_ids=prompts[2], lora_request=r) for r in reqs[1:3]]
    assert 77 not in eng.lora.host  # two adapters registered after it pushed it out of host memory
    shutil.rmtree(gone.lora_path)
    outs = {}
    while eng.has_unfinished_requests():
        outs.update((o.request_id, o) for o in eng.step() if o.finished)
    failed = outs[rid_gone]
    assert failed.finish_reason == "error" and failed.outputs[0].token_ids == []
    assert "'gone'" in failed.error and "no such directory" in failed.error
    assert_same([tessera_result(outs[rid_base])], [base_ref[1]])
    for rid, k in zip(rid_other, (1, 2), strict=True):
        assert_same([tessera_result(outs[rid])], [refs[k][2]])
    assert eng.block_manager.num_used_blocks == 0 and not eng.requests
