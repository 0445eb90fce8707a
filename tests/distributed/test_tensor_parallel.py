"""Tensor parallelism on 2 and 4 gloo ranks spawned by the engine: the same greedy tokens as one process
and logits within 1e-5 (fp32); a dead rank ends the engine with a clear error."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from conftest import assert_same_greedy, prompt_logits, random_prompts

from tessera import LLM, SamplingParams
from tessera.errors import DistributedError, InvalidRequestError

PROMPTS = random_prompts([7, 13, 5], vocab=512, seed=3)


def _engine(path, **kw) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=8 << 20, max_num_seqs=4, progress=False,
               num_threads=1, distributed_timeout_s=60, **kw)


def _reference(path):
    llm = _engine(path)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    logits = prompt_logits(llm, PROMPTS[1])
    llm.close()
    return outs, logits, params


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4 ranks on 2 cores: ~25 s
def test_tensor_parallel_equals_single_process(model_dir, world):
    path = model_dir("llama")  # 4 heads, 2 KV heads: split on 2 ranks, replicated on 4
    want, want_logits, params = _reference(path)
    llm = _engine(path, tensor_parallel_size=world)
    try:
        assert llm.engine.model.cfg.num_heads == 4 // world
        assert llm.engine.model.cfg.num_kv_heads == max(1, 2 // world)
        got = llm.generate(PROMPTS, params, use_tqdm=False)
        got_logits = prompt_logits(llm, PROMPTS[1])
    finally:
        llm.close()
    assert_same_greedy(got, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=0)


def test_tensor_parallel_size_must_divide_heads(model_dir):
    with pytest.raises(InvalidRequestError, match="must divide"):
        _engine(model_dir("llama"), tensor_parallel_size=3)


def test_killed_rank_ends_the_engine_with_a_clear_error(model_dir):
    llm = _engine(model_dir("llama"), tensor_parallel_size=2)
    worker = llm.engine.ranks.processes[0]
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    t0 = time.monotonic()
    with pytest.raises(DistributedError, match="died"):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    assert time.monotonic() - t0 < 30
    with pytest.raises(DistributedError):  # and it stays down
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.close()


@pytest.mark.slow  # a fresh interpreter with its own engine: ~35 s here
def test_workers_exit_when_rank_0_dies(model_dir, tmp_path):
    """Rank 0 (the engine's process) killed outright: its worker notices and exits, no process left."""
    import subprocess
    import sys

    script = (f"from tessera import LLM\n"
              f"llm = LLM({str(model_dir('llama'))!r}, dtype='float32', device='cpu', kv_cache_memory=8 << 20, "
              f"progress=False, num_threads=1, tensor_parallel_size=2)\n"
              f"print(llm.engine.ranks.processes[0].pid, flush=True)\n"
              f"import time; time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        worker = int(proc.stdout.readline())
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(worker):
            time.sleep(0.2)
        assert not _alive(worker), f"worker {worker} still running after rank 0 died"
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
