"""BlockLLM block sharing (tessera.blockllm): several full fine-tunes on one engine give, in one mixed
batch, what each gives alone (greedy fp32 tokens and logprobs); identical blocks are stored once; KV is
shared only between variants whose KV-producing blocks are the same; bad variants are refused clearly;
the server serves each under its name."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from conftest import ThreadServer, random_prompts
from safetensors.torch import load_file, save_file

from tessera import LLM, InvalidRequestError, ModelLoadError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)


def make_variant(base: Path, out: Path, perturb: list[str], seed: int) -> Path:
    """A copy of the checkpoint at `base` with the HF tensors whose names contain any of `perturb`
    changed (as a fine-tune would), the rest byte-identical."""
    shutil.copytree(base, out)
    f = out / "model.safetensors"
    tensors = load_file(f)
    g = torch.Generator().manual_seed(seed)
    hit = 0
    for name, t in tensors.items():
        if any(p in name for p in perturb):
            scale = 0.5 * t.std() if t.std() > 0 else 0.2  # a fresh model's norms are all ones
            tensors[name] = t + scale * torch.randn(t.shape, generator=g)
            hit += 1
    assert hit, perturb
    save_file(tensors, f, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def variants(model_dir, tmp_path_factory):
    """The 2-layer llama and three variants: one differing after every K/V (layer 1's MLP and the final
    norm), one differing early (layer 0's input norm, q/k/v and the embeddings), one identical."""
    base = model_dir("llama")
    root = tmp_path_factory.mktemp("variants")
    late = make_variant(base, root / "late", ["layers.1.mlp.", "model.norm."], seed=1)
    early = make_variant(base, root / "early", ["layers.0.input_layernorm", "layers.0.self_attn.q_proj",
                                                "layers.0.self_attn.k_proj", "embed_tokens"], seed=2)
    same = root / "same"
    shutil.copytree(base, same)
    return {"base": str(base), "late": str(late), "early": str(early), "same": str(same)}


def result(o):
    c = o.outputs[0]
    return c.token_ids, [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]


def assert_same(got, want, where=""):
    """Greedy tokens identical, logprobs within fp32 rounding (the batch's composition changes the GEMM
    blocking, hence the last bits)."""
    assert got[0] == want[0], where
    for a, b in zip(got[1], want[1], strict=True):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5), (where, a, b)


def alone(path: str, prompts) -> list:
    llm = LLM(path, dtype="float32", progress=False)
    return [result(o) for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_mixed_batch_equals_each_variant_alone(variants):
    prompts = random_prompts([5, 19, 33], seed=11)
    want = {name: alone(path, prompts) for name, path in variants.items()}
    assert want["late"] != want["base"] and want["early"] != want["base"]  # the variants differ
    llm = LLM(models=variants, dtype="float32", progress=False)
    names = list(variants)
    order = [(p, n) for p in range(len(prompts)) for n in names]  # every prompt on every variant, interleaved
    outs = llm.generate([prompts[p] for p, _ in order], GREEDY, use_tqdm=False, model=[n for _, n in order])
    for (p, n), o in zip(order, outs, strict=True):
        assert_same(result(o), want[n][p], (n, p))
    assert llm.engine.block_manager.num_used_blocks == 0
    # No model: the first variant.
    for o, w in zip(llm.generate(prompts, GREEDY, use_tqdm=False), want["base"], strict=True):
        assert_same(result(o), w)


def test_mixed_variant_decode_steps_run_in_the_stack(variants, monkeypatch):
    """Decode steps whose rows span variants run in the C++ decode stack (each differing linear carries
    every version, the step's variant runs handed over each step) and give the Python layers' bits;
    a variant whose layer norms differ (per-row norms, which the stack does not take) keeps the Python
    layers, as before."""
    names = ["base", "late", "same"]
    llm = LLM(models={n: variants[n] for n in names}, dtype="float32", progress=False, enable_prefix_caching=False)
    backend = llm.engine.runner.backend
    used = []
    real_get = backend._stacks.get
    monkeypatch.setattr(backend._stacks, "get", lambda *a: used.append(real_get(*a)) or used[-1])
    prompts = random_prompts([5, 19, 33, 8, 12, 7], seed=12)
    models = [names[k % 3] for k in range(len(prompts))]

    def go(fused):
        monkeypatch.setenv("TESSERA_FUSED_DECODE", "1" if fused else "0")
        used.clear()
        outs = llm.generate(prompts, GREEDY, use_tqdm=False, model=models)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs], list(used)

    fused, calls = go(True)
    assert calls and all(s is not None for s in calls)  # every decode step, variants mixed, in the stack
    assert backend._stacks.step_checks  # the variant method handed the stack its runs
    assert fused == go(False)[0]
    want = {n: alone(variants[n], prompts) for n in ("base", "late")}
    for k, (toks, _) in enumerate(fused):
        assert toks == want["base" if models[k] == "same" else models[k]][k][0]
    early = LLM(models={n: variants[n] for n in ("base", "early")}, dtype="float32", progress=False)
    stacks = early.engine.runner.backend._stacks
    early_get = stacks.get
    monkeypatch.setattr(stacks, "get", lambda *a: used.append(early_get(*a)) or used[-1])
    monkeypatch.setenv("TESSERA_FUSED_DECODE", "1")
    used.clear()
    early.generate(prompts[:2], GREEDY, use_tqdm=False, model=["base", "early"])
    assert used and all(s is None for s in used)  # layer 0's input norm differs: the Python layers


def test_identical_blocks_are_stored_once(variants):
    llm = LLM(models=variants, dtype="float32", progress=False)
    vs = llm.engine.variants
    per = vs.stats["blocks_per_variant"]
    # 2 layers x (4 linears + 2 norms) + embeddings + final norm + untied LM head
    assert per == 2 * 6 + 3
    # late: gate_up, down (layer 1) and the final norm; early: input norm, qkv (layer 0), embeddings
    assert vs.stats["blocks_stored"] == per + 3 + 3, [(b.name, b.version_of) for b in vs.differing]
    assert vs.stats["blocks_differing"] == 6
    assert sorted(b.name for b in vs.differing) == sorted(
        ["layers.1.mlp.gate_up_proj", "layers.1.mlp.down_proj", "norm", "layers.0.input_layernorm",
         "layers.0.self_attn.qkv_proj", "embed_tokens"])
    assert vs.stats["weight_bytes_stored"] < 0.7 * vs.stats["weight_bytes_separate"]
    # Variants whose KV comes out the same share the first's cache chain; the early one has its own.
    salts = {v.name: v.cache_salt for v in vs.variants}
    assert salts["base"] is None and salts["same"] is None and salts["late"] is None
    assert salts["early"] is not None


def test_prefix_cache_shares_kv_only_where_the_blocks_before_it_agree(variants):
    prompt = random_prompts([40], seed=12)[0]
    want = {n: alone(p, [prompt])[0] for n, p in variants.items() if n in ("base", "late", "early")}
    llm = LLM(models=variants, dtype="float32", block_size=4, progress=False)
    bm = llm.engine.block_manager
    for name in ("base", "late", "early"):
        q0, h0 = bm.prefix_queries, bm.prefix_hits
        got = result(llm.generate([prompt], GREEDY, use_tqdm=False, model=name)[0])
        assert got[0] == want[name][0]
        hits = bm.prefix_hits - h0
        if name == "late":  # same K/V as base up to its last layer's q/k/v: the prompt's blocks are reused
            assert hits > 0
        else:  # base: the cache was empty; early: its K/V differ from the first layer on
            assert hits == 0, (name, hits, bm.prefix_queries - q0)


def test_bad_variants_and_unknown_models(variants, model_dir):
    with pytest.raises(ModelLoadError, match=r"'other'.*not the architecture of 'base'.*hidden_size"):
        LLM(models={"base": variants["base"], "other": str(model_dir("qwen2"))}, dtype="float32", progress=False)
    with pytest.raises(InvalidRequestError, match="not name=path"):
        LLM(models="a=x,b", progress=False)
    with pytest.raises(InvalidRequestError, match="either model or models"):
        LLM(variants["late"], models=variants, progress=False)
    llm = LLM(models={"base": variants["base"], "late": variants["late"]}, dtype="float32", progress=False)
    with pytest.raises(InvalidRequestError, match=r"prompt 0: the model `nope` does not exist.*`base`, `late`"):
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False, model="nope")
    plain = LLM(variants["base"], dtype="float32", progress=False)
    with pytest.raises(InvalidRequestError, match="runs one model"):
        plain.generate([[5, 6, 7]], GREEDY, use_tqdm=False, model="late")


def test_server_serves_each_variant_by_name(variants):
    from tessera.serve.app import build_app
    from tessera.serve.async_engine import AsyncEngine

    prompt = random_prompts([9], seed=13)[0]
    want = {n: alone(variants[n], [prompt])[0][0][:4] for n in ("base", "late", "early")}
    llm = LLM(models={n: variants[n] for n in ("base", "late", "early")}, dtype="float32", progress=False)
    with ThreadServer(build_app(AsyncEngine(llm.engine), "ignored")) as url:
        data = httpx.get(f"{url}/v1/models").json()["data"]
        assert [(m["id"], m["root"]) for m in data] == [(n, variants[n]) for n in ("base", "late", "early")]
        for name in ("late", "base", "early"):
            r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 4,
                                                          "temperature": 0, "ignore_eos": True, "logprobs": 0},
                           timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == name
            toks = [int(t.removeprefix("token_id:")) for t in r.json()["choices"][0]["logprobs"]["tokens"]]
            assert toks == want[name]
        r = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": prompt, "max_tokens": 2}, timeout=60)
        assert r.status_code == 404
        err = r.json()["error"]
        assert "`nope`" in err["message"] and err["code"] == "model_not_found" and json.dumps(err)


def test_tied_embeddings_that_differ_change_the_lm_head_too(model_dir, tmp_path):
    base = str(model_dir("llama_mqa_tied"))
    other = str(make_variant(Path(base), tmp_path / "tied", ["embed_tokens"], seed=3))
    prompts = random_prompts([7, 12], seed=14)
    want = {"a": alone(base, prompts), "b": alone(other, prompts)}
    llm = LLM(models={"a": base, "b": other}, dtype="float32", progress=False)
    assert [b.name for b in llm.engine.variants.differing] == ["embed_tokens"]
    outs = llm.generate(prompts * 2, GREEDY, use_tqdm=False, model=["b", "a", "a", "b"])
    for o, (n, p) in zip(outs, [("b", 0), ("a", 1), ("a", 0), ("b", 1)], strict=True):
        assert_same(result(o), want[n][p], (n, p))
