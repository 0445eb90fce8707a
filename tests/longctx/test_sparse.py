"""Sparse KV retrieval: with k >= the context it equals dense attention; only changed positions are
fetched into the working sets; results survive batching with dense requests and preemption."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

from tessera import LLM, SamplingParams
from tessera.longctx import SparseConfig
from tessera.longctx.sparse import WorkingSet

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
LENGTHS = [40, 97, 150, 9]


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, seed=21)


@pytest.fixture(scope="module")
def dense(model_dir, prompts):
    llm = LLM(str(model_dir("qwen3_gqa8")), progress=False)
    return llm.generate(prompts, PARAMS, use_tqdm=False)


def logprob_of_chosen(out) -> torch.Tensor:
    return torch.tensor([lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, out.token_ids, strict=True)])


def check_blocks_free(llm):
    bm = llm.engine.block_manager
    assert bm.num_used_blocks == 0 and all(b.ref_count == 0 for b in bm.blocks)


@pytest.mark.parametrize("kw, offload", [(dict(), False), (dict(max_num_batched_tokens=32), False), (dict(), True)],
                         ids=["batched", "chunked", "offload"])
def test_sparse_with_k_at_least_context_equals_dense(model_dir, prompts, dense, kw, offload):
    llm = LLM(str(model_dir("qwen3_gqa8")), progress=False, **kw)
    cfg = SparseConfig(top_k=4096, retrieval_layers=1, measure_recall=True, offload=offload)
    outs = llm.generate(prompts, PARAMS, use_tqdm=False, long_context=cfg)
    for d, s in zip(dense, outs, strict=True):
        assert s.token_ids == d.token_ids
        torch.testing.assert_close(logprob_of_chosen(s), logprob_of_chosen(d), rtol=1e-5, atol=1e-5)
    stats = llm.engine.sparse_stats
    assert stats["steps"] == len(prompts) * (PARAMS.max_tokens - 1)  # every decode step went sparse
    assert stats["selected_fraction"] == 1.0 and stats["recall"] == 1.0
    assert stats["attention_mass_covered"] == pytest.approx(1.0, abs=1e-5)
    check_blocks_free(llm)


def test_only_changed_positions_are_fetched(model_dir, monkeypatch):
    changed = []
    original = WorkingSet.update

    def counting(self, selection):
        before = set(self.pos_slot)
        slots, positions = original(self, selection)
        expected = sorted(set(selection) - before)
        assert sorted(positions) == expected  # exactly the positions the working set lacked
        assert sorted(self.pos_slot) == sorted(selection)
        changed.append(len(expected))
        return slots, positions

    monkeypatch.setattr(WorkingSet, "update", counting)
    llm = LLM(str(model_dir("llama")), progress=False)
    cfg = SparseConfig(top_k=16, sink_tokens=2, recent_tokens=8, retrieval_layers=1)
    prompt = random_prompts([300], seed=4)[0]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False,
                       long_context=cfg)[0]
    assert len(out.token_ids) == 40
    stats = llm.engine.sparse_stats
    assert stats["fetched_per_step"] * stats["steps"] == sum(changed)
    budget = cfg.budget - 1
    assert changed[0] == budget  # the first step fills the working set...
    # ...later steps keep the sinks and all but one of the recent window: at most the top-k and the
    # newest position change (a random model's diffuse attention reshuffles its top-k a lot).
    assert all(c <= cfg.top_k + 1 for c in changed[1:]) and sum(changed[1:]) < budget * (len(changed) - 1)
    assert stats["selected_per_step"] == budget and stats["fetched_fraction"] < 0.1
    check_blocks_free(llm)


def offload_run(llm, prompts, params, cfg, monkeypatch):
    """Runs cfg with offload, checking after every step that each host store holds exactly the paged
    pool's K/V of the positions it has taken (every sparse layer), and that it took every position the
    step's sequences had cached. Returns the outputs and the steps' (position count, spilled) pairs."""
    from tessera.engine.block_manager import paged_slots
    from tessera.longctx.sparse import SparseStep

    seen = []
    original = SparseStep.finish

    def checked(self):
        original(self)
        caches = self.owner.kv_caches
        for seq in self.seqs:
            store, p = seq.host_kv, seq.num_computed_tokens
            assert store is not None and store.num_spilled == p
            assert store.pin == (caches[0][0].device.type == "cuda")
            slots = torch.tensor(paged_slots(seq.block_table, range(p), self.owner.block_size))
            for layer in range(1, len(caches)):
                for tier, cache in zip((store.k, store.v), caches[layer], strict=True):
                    flat = cache.view(-1, *cache.shape[-2:])
                    assert torch.equal(tier[layer - 1, :p], flat[slots.to(flat.device)].cpu())
            seen.append((p, store.num_spilled))

    monkeypatch.setattr(SparseStep, "finish", checked)
    outs = llm.generate(prompts, params, use_tqdm=False, long_context=cfg)
    monkeypatch.setattr(SparseStep, "finish", original)
    return outs, seen


def test_offload_to_a_host_store_equals_fetching_from_the_paged_pool(model_dir, prompts, monkeypatch):
    """The slow tier as a host store (the GPU's path, here between two host pools) changes nothing:
    same tokens and log-probabilities as fetching from the paged pool; every position is spilled once."""
    llm = LLM(str(model_dir("llama")), progress=False)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2)
    small = dict(top_k=24, sink_tokens=2, recent_tokens=8, retrieval_layers=1)
    paged = llm.generate(prompts, params, use_tqdm=False, long_context=SparseConfig(**small, offload=False))
    assert llm.engine.sparse_stats["spilled_per_step"] == 0
    llm.engine.block_manager.reset_prefix_cache()  # the same prefill, bit for bit
    outs, seen = offload_run(llm, prompts, params, SparseConfig(**small, offload=True), monkeypatch)
    for a, b in zip(paged, outs, strict=True):
        assert a.token_ids == b.token_ids
        assert torch.equal(logprob_of_chosen(a), logprob_of_chosen(b))
    stats = llm.engine.sparse_stats
    # Each sequence spills its prompt at its first sparse step, then the one token decoded before.
    decoded = [len(p) + params.max_tokens - 2 for p in prompts]
    assert stats["spilled_per_step"] * stats["steps"] == sum(decoded)
    assert max(p for p, _ in seen) == max(decoded)
    check_blocks_free(llm)


@pytest.mark.gpu
def test_offload_on_a_gpu_fetches_from_pinned_host_memory(model_dir, prompts, monkeypatch):
    """On a GPU, offload is the default: the host stores are page-locked, each holds the paged pool's
    K/V after every step, and the tokens equal fetching from the device's paged pool (and, with
    k >= context, dense attention)."""
    llm = LLM(str(model_dir("llama")), progress=False, dtype="float32", device="cuda")
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2)
    small = dict(top_k=24, sink_tokens=2, recent_tokens=8, retrieval_layers=1)
    paged = llm.generate(prompts, params, use_tqdm=False, long_context=SparseConfig(**small, offload=False))
    llm.engine.block_manager.reset_prefix_cache()
    outs, seen = offload_run(llm, prompts, params, SparseConfig(**small), monkeypatch)
    assert seen and llm.engine.sparse_stats["spilled_per_step"] > 0
    for a, b in zip(paged, outs, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(logprob_of_chosen(a), logprob_of_chosen(b), rtol=1e-5, atol=1e-5)
    dense = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    full = llm.generate(prompts, params, use_tqdm=False, long_context=SparseConfig(top_k=4096, retrieval_layers=1))
    assert [o.token_ids for o in full] == dense
    check_blocks_free(llm)


def test_sparse_and_dense_requests_share_a_batch(model_dir, prompts, dense):
    llm = LLM(str(model_dir("qwen3_gqa8")), progress=False)
    eng = llm.engine
    cfg = SparseConfig(top_k=4096, retrieval_layers=1)
    rids = [eng.add_request(None, PARAMS, prompt_token_ids=p) for p in prompts]
    for rid in rids[::2]:
        eng.set_sparse(rid, cfg)
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert [done[r].token_ids for r in rids] == [d.token_ids for d in dense]
    check_blocks_free(llm)


def test_sparse_survives_preemption(model_dir, prompts, monkeypatch):
    from tessera.longctx.sparse import SparseKV

    planned = []  # every sequence that decoded sparsely
    original = SparseKV.plan
    monkeypatch.setattr(SparseKV, "plan", lambda self, seqs, rows: planned.extend(seqs) or original(self, seqs, rows))
    cfg = SparseConfig(top_k=32, sink_tokens=2, recent_tokens=8, retrieval_layers=1)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ample = LLM(str(model_dir("llama")), progress=False)
    want = [o.token_ids for o in ample.generate(prompts, params, use_tqdm=False, long_context=cfg)]
    from tessera.engine.model_runner import ModelRunner

    per_block = ModelRunner.kv_bytes_per_block(ample.engine.model_config, 16, torch.float32)
    tight = LLM(str(model_dir("llama")), progress=False, kv_cache_memory=13 * per_block, prefix_planning="off")
    got = tight.generate(prompts, params, use_tqdm=False, long_context=cfg)
    assert tight.engine.scheduler.total_preemptions > 0
    assert [o.token_ids for o in got] == want
    check_blocks_free(tight)
    assert planned and all(seq.working_set is None for seq in planned)  # dropped with their blocks
    offloaded = tight.generate(prompts, params, use_tqdm=False, long_context=SparseConfig(
        top_k=32, sink_tokens=2, recent_tokens=8, retrieval_layers=1, offload=True))
    assert [o.token_ids for o in offloaded] == want
    assert all(seq.host_kv is None for seq in planned)


def test_sparse_on_the_gpu_code_path(model_dir, monkeypatch):
    """The Triton backend (its interpreter on CPU): sparse rows replace the kernels' results; with a
    small top-k the run completes and returns every block; with k >= context it equals dense."""
    import triton  # noqa: F401  (a dev dependency: fail loudly without it)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv("TESSERA_ATTENTION_BACKEND", "triton")
    llm = LLM(str(model_dir("llama")), progress=False, dtype="float32", device=device)
    assert llm.engine.runner.backend.name == "triton"
    prompts = random_prompts([30, 12], seed=8)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    dense = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    full = llm.generate(prompts, params, use_tqdm=False, long_context=SparseConfig(top_k=4096, retrieval_layers=1))
    assert [o.token_ids for o in full] == dense
    small = SparseConfig(top_k=4, sink_tokens=1, recent_tokens=4, retrieval_layers=1)
    assert all(len(o.token_ids) == 6 for o in llm.generate(prompts, params, use_tqdm=False, long_context=small))
    check_blocks_free(llm)


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=32)], ids=["whole", "chunked"])
def test_prompt_observation_matches_hf_attention_and_joins_every_selection(model_dir, monkeypatch, kw):
    """The observation is the largest attention probability (over layers, heads and the window's
    queries) that HF's eager attention gives each prompt position; its top positions are in every
    step's selection. Chunked, the window is split across two prefill chunks."""
    from conftest import load_hf

    from tessera.longctx.sparse import SparseKV, observed_positions

    planned, selections = [], []
    plan, update = SparseKV.plan, WorkingSet.update
    monkeypatch.setattr(SparseKV, "plan", lambda self, seqs, rows: planned.extend(seqs) or plan(self, seqs, rows))
    monkeypatch.setattr(WorkingSet, "update", lambda self, sel: selections.append(list(sel)) or update(self, sel))
    path = model_dir("llama")
    prompt = random_prompts([150], seed=5)[0]
    cfg = SparseConfig(top_k=24, observed_tokens=12, observe_window=20, sink_tokens=2, recent_tokens=8,
                       retrieval_layers=1)
    llm = LLM(str(path), progress=False, **kw)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False,
                       long_context=cfg)[0]
    assert len(out.token_ids) == 12
    seq = planned[0]
    with torch.no_grad():
        attn = load_hf(path)(torch.tensor([prompt]), output_attentions=True).attentions
    want = torch.stack([a[0, :, -cfg.observe_window:, :].amax((0, 1)) for a in attn]).amax(0)
    torch.testing.assert_close(seq.prompt_observation, want, rtol=1e-4, atol=1e-6)
    for step, selection in enumerate(selections):
        p = len(prompt) + step
        fixed = observed_positions(seq, cfg.sink_tokens, p - cfg.recent_tokens, cfg.observed_tokens)
        assert fixed.numel() == cfg.observed_tokens and set(fixed.tolist()) <= set(selection)
        assert len(selection) == cfg.budget - 1
    check_blocks_free(llm)


def test_sparse_outputs_never_enter_the_prefix_cache(model_dir):
    """A sparse decode's generated tokens have approximate K/V: a dense request whose prompt continues
    the sparse one reuses only the prompt's blocks, and its result equals a cold dense run."""
    llm = LLM(str(model_dir("llama")), progress=False)
    prompt = random_prompts([70], seed=9)[0]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    cfg = SparseConfig(top_k=8, sink_tokens=2, recent_tokens=4, retrieval_layers=1, observed_tokens=4)
    sparse_out = llm.generate(prompt, params, use_tqdm=False, long_context=cfg)[0]
    follow_up = prompt + sparse_out.token_ids
    warm = llm.generate(follow_up, params, use_tqdm=False)[0]
    assert warm.metrics["num_cached_tokens"] == len(prompt) // 16 * 16
    cold = LLM(str(model_dir("llama")), progress=False).generate(follow_up, params, use_tqdm=False)[0]
    assert warm.token_ids == cold.token_ids
    check_blocks_free(llm)
