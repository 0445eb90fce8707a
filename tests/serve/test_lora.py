"""LoRA adapters in the server: --lora-modules, /v1/models, a request's `model` naming an adapter (its
output equals LLM.generate with that adapter), the 404 for an unknown name, and the runtime load/unload
endpoints with their errors."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from conftest import ThreadServer, random_prompts

from tessera import LLM, InvalidRequestError, LoRARequest, SamplingParams
from tessera.serve.app import build_app
from tessera.serve.async_engine import AsyncEngine
from tessera.serve.lora import parse_lora_modules

BASE = "tiny-base"
N = 6


@pytest.fixture(scope="module")
def lora_server(model_dir, lora_dir):
    a, b, c = (str(lora_dir("llama", seed=s)) for s in (21, 22, 23))
    llm = LLM(str(model_dir("llama")), progress=False, enable_lora=True, max_loras=2)
    prompt = random_prompts([11], seed=8)[0]
    greedy = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    refs = {name: llm.generate([prompt], greedy, use_tqdm=False, lora_request=lr)[0].outputs[0].token_ids
            for name, lr in [("base", None), ("a", LoRARequest("a", 101, a)), ("b", LoRARequest("b", 102, b)),
                             ("c", LoRARequest("c", 103, c))]}
    assert len({tuple(t) for t in refs.values()}) == 4  # the adapters change the output
    app = build_app(AsyncEngine(llm.engine), BASE, lora_modules=[f"a={a}", json.dumps({"name": "b", "path": b})],
                    allow_runtime_lora_updating=True)
    with ThreadServer(app) as url:
        yield url, prompt, refs, c


def complete(url, model, prompt):
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": N, "logprobs": 0,
                                                     "temperature": 0, "ignore_eos": True}, timeout=60)


def token_ids(r) -> list[int]:
    """The tiny model has no tokenizer: its logprobs name tokens as token_id:N."""
    return [int(t.removeprefix("token_id:")) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


def test_models_lists_adapters_with_their_parent(lora_server):
    url, *_ = lora_server
    data = httpx.get(f"{url}/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [(BASE, None), ("a", BASE), ("b", BASE)]


def test_request_model_selects_the_adapter(lora_server):
    url, prompt, refs, _ = lora_server
    for model in (BASE, "a", "b", BASE):
        r = complete(url, model, prompt)
        assert r.status_code == 200, r.text
        assert token_ids(r) == refs["base" if model == BASE else model]
        assert r.json()["model"] == model
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 2}, timeout=60)
    assert r.status_code in (200, 400), r.text  # the tiny model may have no chat template; never a 500


def test_unknown_model_is_a_404_naming_it(lora_server):
    url, prompt, *_ = lora_server
    r = complete(url, "no-such-adapter", prompt)
    assert r.status_code == 404
    err = r.json()["error"]
    assert "no-such-adapter" in err["message"] and err["code"] == "model_not_found" and err["param"] == "model"


def test_load_and_unload_adapters(lora_server):
    url, prompt, refs, c = lora_server
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": c})
    assert r.status_code == 200, r.text
    assert "c" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    # Three adapters over two slots, in turn: the LRU swaps keep each output its own.
    for model in ("c", "a", "b", "c"):
        assert token_ids(complete(url, model, prompt)) == refs[model]
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": c})
    assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": "/nonexistent/x"})
    assert r.status_code == 404 and "no such directory" in r.json()["error"]["message"]  # vLLM's 404 too
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "e", "lora_path": c, "rank": 3})
    assert r.status_code == 400 and "rank" in r.json()["error"]["message"]  # unknown fields are refused
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 200
    assert complete(url, "c", prompt).status_code == 404
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "c"})
    assert r.status_code == 404 and "'c'" in r.json()["error"]["message"]
    assert complete(url, "a", prompt).status_code == 200  # the others still serve


def test_adapter_whose_files_vanished_is_a_4xx_naming_it(model_dir, lora_dir, tmp_path):
    """An adapter served while its files existed, then deleted: a request for it is a 404 naming the
    adapter and what is missing (vLLM's answer for an adapter it finds no files of), not a 500, whether
    the engine finds out when registering the request or only when putting the adapter in a slot (after
    it fell out of host memory); a stream gets the same error as its event; other requests still serve."""
    gone = shutil.copytree(lora_dir("llama", seed=24), tmp_path / "gone")
    llm = LLM(str(model_dir("llama")), progress=False, enable_lora=True, max_loras=2)
    prompt = random_prompts([11], seed=8)[0]
    app = build_app(AsyncEngine(llm.engine), BASE, lora_modules=[f"a={lora_dir('llama', seed=21)}", f"gone={gone}"])
    lora = llm.engine.lora
    real_activate = lora.activate

    def activate_after_eviction(seqs):
        # As when other adapters push it out of host memory between its registration and its first step.
        for s in seqs:
            if s.lora_request is not None and s.lora_request.lora_name == "gone":
                lora.host.pop(s.lora_request.lora_int_id, None)
        return real_activate(seqs)

    with ThreadServer(app) as url:
        assert complete(url, "gone", prompt).status_code == 200
        held = dict(lora.host)  # the adapter in host memory, as it was when its requests were registered
        shutil.rmtree(gone)
        # Registered and in host memory, then gone when its slot is filled (the engine's activate).
        lora.activate = activate_after_eviction
        lora.slot_ids = [None] * lora.max_loras  # so that it must be loaded into a slot again
        for stream in (False, True):
            lora.host.update(held)
            body = {"model": "gone", "prompt": prompt, "max_tokens": N, "stream": stream}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            if stream and r.status_code == 200:  # the stream had started: the error is its last event
                events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
                err = events[-1]["error"]
            else:
                assert r.status_code == 404, r.text
                err = r.json()["error"]
            assert err["type"] == "not_found_error" and err["code"] == "lora_not_found"
            assert "'gone'" in err["message"] and "no such directory" in err["message"]
        lora.activate = real_activate
        # Not in host memory when the request registers it: the same 404, from add_request.
        lora.host.clear()
        r = complete(url, "gone", prompt)
        assert r.status_code == 404 and "'gone'" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["code"] == "lora_not_found"
        for model in ("a", BASE):  # the rest serve on
            assert complete(url, model, prompt).status_code == 200


def test_lora_modules_parsing_and_startup_errors(model_dir, lora_dir):
    assert parse_lora_modules(["x=/p", '{"name": "y", "path": "/q", "base_model_name": "m"}']) == [
        ("x", "/p", None), ("y", "/q", "m")]
    with pytest.raises(InvalidRequestError, match="expected name=path"):
        parse_lora_modules(["just-a-path"])
    plain = LLM(str(model_dir("llama")), progress=False)
    with pytest.raises(InvalidRequestError, match="--enable-lora"):
        build_app(AsyncEngine(plain.engine), BASE, lora_modules=[f"a={lora_dir('llama', seed=21)}"])
