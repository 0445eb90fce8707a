"""CUDA graphs of decode steps (tessera/engine/cuda_graphs.py): replay equals the eager forward, padding
included, and only the steps it can take go through it.

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1 from conftest) and
`DecodeGraphs` replays without a capture, on the same static buffers: the test checks everything the
graphs do but the capture itself. The `gpu` test captures real graphs (`make test-gpu`)."""

from __future__ import annotations

import pytest
import torch
import triton  # noqa: F401  (a dev dependency: the suite fails loudly without it)
from conftest import random_prompts

from tessera import LLM, SamplingParams
from tessera.engine.block_manager import NULL_BLOCK
from tessera.engine.cuda_graphs import DecodeGraphs, graph_buckets, unsupported_reason


def test_buckets_cover_every_batch_with_little_padding():
    assert graph_buckets(1) == [1] and graph_buckets(3) == [1, 2, 3] and graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    b = graph_buckets(256)
    assert b[-1] == 256 and len(b) == 4 + 16
    for n in range(1, 257):
        pad = next(x for x in b if x >= n) - n
        assert pad <= 15


def _generate(llm, prompts, lengths):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_replayed_decode_steps_equal_eager(model_dir, arch, monkeypatch):
    monkeypatch.setenv("TESSERA_ATTENTION_BACKEND", "triton")
    prompts = random_prompts([3, 9, 17, 5, 12], seed=31)
    # Sequences finish at different steps: decode batches of 5, 4, 3, 2 and 1 rows, so buckets 1, 2, 4
    # and 5 replay, two of them padded.
    lengths = [7, 3, 6, 2, 5]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(progress=False, max_num_seqs=5, max_num_batched_tokens=64, dtype="float32", device=device)
    eager = LLM(str(model_dir(arch)), enforce_eager=True, **kw)
    assert eager.engine.runner.graphs is None
    eager.engine.runner.kv_cache.zero_()
    want = _generate(eager, prompts, lengths)

    llm = LLM(str(model_dir(arch)), **kw)
    runner = llm.engine.runner
    if runner.graphs is None:  # CPU: no capture at load; the same buffers replayed eagerly
        runner.graphs = DecodeGraphs(runner, 5, llm.engine.max_model_len)
        runner.graphs.capture()
    assert runner.graphs.buckets == [1, 2, 4, 5]
    runner.kv_cache.zero_()
    got = _generate(llm, prompts, lengths)
    assert got == want
    # the same blocks hold the same K/V: padded rows wrote nowhere but the null block (the blocks are
    # handed out in the same order in both engines)
    assert torch.equal(runner.kv_cache[:, :, NULL_BLOCK + 1:], eager.engine.runner.kv_cache[:, :, NULL_BLOCK + 1:])
    # every decode-only step replayed (the first step of each sequence is its prefill, run eagerly)
    assert runner.graphs.replays >= max(lengths) - 1
    assert llm.engine.block_manager.num_used_blocks == 0
    assert torch.isfinite(runner.kv_cache[:, :, NULL_BLOCK]).all()  # padded rows wrote only finite K/V
    # a later batch with other lengths (and a wider block table) through the same graphs
    more = random_prompts([40, 2], seed=32)
    assert _generate(llm, more, [9, 4]) == _generate(eager, more, [9, 4])


def test_steps_graphs_cannot_take_run_eagerly(model_dir, monkeypatch):
    monkeypatch.setenv("TESSERA_ATTENTION_BACKEND", "triton")
    llm = LLM(str(model_dir("llama")), progress=False, max_num_seqs=4, dtype="float32", device="cpu")
    graphs = DecodeGraphs(llm.engine.runner, 4, llm.engine.max_model_len)
    graphs.capture()
    runner = llm.engine.runner
    # a prefill chunk in the step, too many rows, or a table wider than the buffers: not replayable
    from tessera.ops.attention import AttentionMetadata

    meta = AttentionMetadata(slot_mapping=torch.zeros(3, dtype=torch.long), num_decode=2, backend=runner.backend,
                             block_tables=torch.zeros((3, 1), dtype=torch.int32))
    assert not graphs.can_replay(torch.zeros(3, dtype=torch.long), meta)
    meta.num_decode = 3
    assert graphs.can_replay(torch.zeros(3, dtype=torch.long), meta)
    assert not graphs.can_replay(torch.zeros(5, dtype=torch.long), AttentionMetadata(
        slot_mapping=torch.zeros(5, dtype=torch.long), num_decode=5, block_tables=torch.zeros((5, 1))))
    meta.block_tables = torch.zeros((3, graphs.width + 1), dtype=torch.int32)
    assert not graphs.can_replay(torch.zeros(3, dtype=torch.long), meta)
    meta.block_tables, meta.sparse = torch.zeros((3, 1), dtype=torch.int32), object()
    assert not graphs.can_replay(torch.zeros(3, dtype=torch.long), meta)
    # a hook put on a layer after capture (a fleet's layer streaming) would not run in a replay
    meta.sparse = None
    handle = runner.model.layers[1].register_forward_hook(lambda *a: None)
    assert not graphs.can_replay(torch.zeros(3, dtype=torch.long), meta)
    assert "hooks" in unsupported_reason(runner)
    handle.remove()
    assert graphs.can_replay(torch.zeros(3, dtype=torch.long), meta)


def test_what_graphs_cannot_capture_is_named(model_dir, monkeypatch):
    monkeypatch.setenv("TESSERA_ATTENTION_BACKEND", "torch")
    llm = LLM(str(model_dir("llama")), progress=False, dtype="float32", device="cpu")
    assert "torch backend" in unsupported_reason(llm.engine.runner)
    monkeypatch.setenv("TESSERA_ATTENTION_BACKEND", "triton")
    llm = LLM(str(model_dir("llama")), progress=False, dtype="float32", device="cpu", enable_lora=True)
    assert "LoRA" in unsupported_reason(llm.engine.runner)
    llm = LLM(str(model_dir("llama")), progress=False, dtype="float32", device="cpu", quantization="bits:4")
    assert "linear method" in unsupported_reason(llm.engine.runner)
    llm = LLM(str(model_dir("llama")), progress=False, dtype="float32", device="cpu")
    assert unsupported_reason(llm.engine.runner) is None


@pytest.mark.gpu
def test_graphs_are_captured_on_cuda_and_replay_a_large_batch(model_dir):
    prompts = random_prompts([5 + 3 * i for i in range(40)], seed=33)
    lengths = [4 + i % 9 for i in range(40)]
    eager = LLM(str(model_dir("llama")), progress=False, dtype="float32", device="cuda", enforce_eager=True)
    llm = LLM(str(model_dir("llama")), progress=False, dtype="float32", device="cuda", max_num_seqs=48)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.graphs[48].graph is not None
    assert _generate(llm, prompts, lengths) == _generate(eager, prompts, lengths)
    assert graphs.replays > 0
