"""Default sampling values from generation_config.json (tessera/generation_config.py), offline and in
the server's request translation."""

from __future__ import annotations

import json
import shutil

import pytest

from tessera import LLM, SamplingParams
from tessera.generation_config import load_generation_defaults

GEN = {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.0, "top_p": 0.9, "top_k": 5, "min_p": 0.05,
       "repetition_penalty": 1.1, "max_new_tokens": 7, "do_sample": True}
WANT = {"temperature": 0.0, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "max_tokens": 7}


@pytest.fixture(scope="module")
def gen_model(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "llama"
    shutil.copytree(model_dir("llama"), path)
    (path / "generation_config.json").write_text(json.dumps(GEN))
    return path


def test_read_from_the_file_or_nothing(gen_model, tmp_path, caplog):
    assert load_generation_defaults(gen_model) == WANT
    assert load_generation_defaults(gen_model, "vllm") == {}
    assert load_generation_defaults(tmp_path) == {}  # no file: nothing changes
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1, "top_k": 3}))
    assert load_generation_defaults(tmp_path) == {}
    assert "temperature must be >= 0" in caplog.text  # an unusable file is logged, not applied


def test_llm_default_sampling_params_and_generate_without_params(gen_model):
    llm = LLM(str(gen_model), progress=False)
    sp = llm.get_default_sampling_params()
    assert {k: getattr(sp, k) for k in WANT} == WANT
    prompt = [5, 6, 7, 8]
    out = llm.generate(prompt, use_tqdm=False)[0]
    same = llm.generate(prompt, SamplingParams(**WANT), use_tqdm=False)[0]
    assert out.token_ids == same.token_ids and len(out.token_ids) <= 7
    # A SamplingParams built by hand stays as built (vLLM's behaviour).
    assert SamplingParams().temperature == 1.0 and SamplingParams().max_tokens == 16
    plain = LLM(str(gen_model), progress=False, generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()


def test_server_fills_only_what_the_request_leaves_unset(gen_model):
    from tessera.serve.async_engine import AsyncEngine
    from tessera.serve.protocol import ChatCompletionRequest, CompletionRequest
    from tessera.serve.serving import OpenAIServer, Prompt

    server = OpenAIServer(AsyncEngine(LLM(str(gen_model), progress=False).engine), "m")
    prompt = Prompt(None, [5, 6, 7])
    sp = server.sampling_params(CompletionRequest(prompt=prompt.ids), prompt, 4, None)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.repetition_penalty) == (0.0, 0.9, 5, 0.05, 1.1)
    req = CompletionRequest(prompt=prompt.ids, temperature=0.7, top_k=0, top_p=1.0)
    sp = server.sampling_params(req, prompt, 4, None)
    assert (sp.temperature, sp.top_k, sp.top_p, sp.min_p) == (0.7, -1, 1.0, 0.05)
    # max_new_tokens is the default max_tokens, capped by what the context leaves
    assert server.resolve_max_tokens(3, None, "prompt", server.defaults.get("max_tokens")) == 7
    assert server.resolve_max_tokens(1020, None, "prompt", server.defaults.get("max_tokens")) == 4
    assert server.resolve_max_tokens(3, 100, "prompt", server.defaults.get("max_tokens")) == 100
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]).temperature is None
