"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) against HF transformers (fp32): routing, logits at
every position, greedy tokens in a chunked-prefill batch, GGUF round trips, the grouped expert path
against a per-expert reference, and the expert-executor seam."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import MOE_ARCHS, check_logits_at_every_position, load_hf, make_hf_config, random_prompts, rel_err
from gguf_files import write_gguf

from tessera import LLM, SamplingParams
from tessera.config import ModelConfig
from tessera.errors import InvalidRequestError, ModelLoadError
from tessera.models.gguf import convert_gguf
from tessera.models.moe import MoeForCausalLM, SparseMoeBlock, route
from tessera.models.moe_executor import ExpertExecutor, Routing, set_expert_executor
from tessera.ops.backend import TorchBackend

ARCHS = list(MOE_ARCHS)


@pytest.fixture(scope="module")
def llms(model_dir):
    """One engine per architecture (the C++ kernels backend, the CPU default), built once."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = LLM(str(model_dir(arch)), progress=False, max_num_batched_tokens=4096)
        return cache[arch]

    return get


def reference_moe(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """The routed experts the plain way: each expert on the tokens that chose it (F.linear), weighted,
    summed per token in expert order (as transformers does). Without the shared expert."""
    routing = route(block.gate(x), block.moe, block.keep_fp32_weights)
    out = torch.zeros_like(x)
    f = block.experts.inter
    for e in range(block.moe.num_experts):
        token, slot = torch.where(routing.topk_ids == e)
        gate_up = F.linear(x[token], block.experts.w_gate_up[e])
        h = F.linear(F.silu(gate_up[:, :f]) * gate_up[:, f:], block.experts.w_down[e])
        out.index_add_(0, token, (h * routing.topk_weights[token, slot, None]).to(x.dtype))
    return out


def test_config_reads_each_family(model_dir):
    mixtral = ModelConfig.from_dir(model_dir("mixtral")).moe
    assert (mixtral.num_experts, mixtral.top_k, mixtral.expert_intermediate_size) == (4, 2, 96)
    assert mixtral.norm_topk_prob and mixtral.shared_expert_intermediate_size == 0
    qwen2 = ModelConfig.from_dir(model_dir("qwen2_moe"))
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.qk_norm
    assert (qwen2.moe.num_experts, qwen2.moe.top_k, qwen2.moe.norm_topk_prob) == (8, 3, False)
    assert qwen2.moe.shared_expert_intermediate_size == 80
    assert [qwen2.moe.is_sparse(i) for i in range(3)] == [True, False, True]  # mlp_only_layers=[1]
    qwen3 = ModelConfig.from_dir(model_dir("qwen3_moe"))
    assert qwen3.qk_norm and qwen3.moe.norm_topk_prob and qwen3.moe.num_experts == 8


def test_bad_moe_config_is_a_load_error(tmp_path, model_dir):
    raw = json.loads((model_dir("qwen3_moe") / "config.json").read_text())
    raw["num_experts_per_tok"] = 9  # of 8
    with pytest.raises(ModelLoadError, match="9 per token"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("arch", ARCHS)
def test_routing_matches_hf_router(model_dir, llms, arch):
    hf = load_hf(model_dir(arch))
    block = llms(arch).engine.model.layers[0].mlp
    x = torch.randn(200, hf.config.hidden_size, generator=torch.Generator().manual_seed(0))
    _, hf_weights, hf_ids = hf.model.layers[0].mlp.gate(x)
    ours = route(block.gate(x), block.moe, block.keep_fp32_weights)
    assert torch.equal(ours.topk_ids, hf_ids)
    assert ours.topk_weights.dtype == hf_weights.dtype
    torch.testing.assert_close(ours.topk_weights, hf_weights, rtol=1e-6, atol=1e-7)
    # The families differ where it shows: Qwen2-MoE's weights are not renormalised, the others' are.
    sums = ours.topk_weights.sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums)) == (arch != "qwen2_moe")


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_experts_equal_per_expert_reference(llms, arch):
    model = llms(arch).engine.model
    assert isinstance(model, MoeForCausalLM)
    block = model.moe_blocks()[0]
    x = torch.randn(37, model.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    routing = route(block.gate(x), block.moe, block.keep_fp32_weights)
    assert torch.unique(routing.topk_ids).numel() == block.moe.num_experts  # every expert has rows
    grouped = block.executor(block, x, routing, TorchBackend(torch.device("cpu")))
    torch.testing.assert_close(grouped, reference_moe(block, x), rtol=1e-5, atol=1e-5)
    # A single token (a decode step of batch 1): its k experts only.
    torch.testing.assert_close(block.executor(block, x[:1], route(block.gate(x[:1]), block.moe, False),
                                              TorchBackend(torch.device("cpu"))),
                               reference_moe(block, x[:1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu-kernels", "torch"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_hf_at_every_position(model_dir, arch, backend, monkeypatch):
    monkeypatch.setenv("TESSERA_ATTENTION_BACKEND", backend)
    path = model_dir(arch)
    llm = LLM(str(path), progress=False, max_num_batched_tokens=4096)
    assert llm.engine.runner.backend.name == backend
    check_logits_at_every_position(llm, load_hf(path), random_prompts([1, 7, 17, 45, 130], seed=1))


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_in_a_chunked_prefill_batch(model_dir, arch):
    path = model_dir(arch)
    # 40 tokens a step: the 70- and 100-token prompts are prefilled in chunks, alongside other rows' decodes.
    llm = LLM(str(path), progress=False, max_num_batched_tokens=40, max_num_seqs=8)
    hf = load_hf(path)
    prompts = random_prompts([1, 9, 33, 70, 100], seed=2)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for p, out in zip(prompts, outs, strict=True):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p):].tolist()
        assert out.token_ids == ref, (arch, len(p))


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_round_trip(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    # llama.cpp has no dense layers inside a Qwen2-MoE: every layer sparse here.
    overrides = {"mlp_only_layers": []} if arch == "qwen2_moe" else {}
    torch.manual_seed(3)
    hf = AutoModelForCausalLM.from_config(make_hf_config(arch, **overrides)).eval()
    gguf_path = write_gguf(hf, tmp_path / f"{arch}.gguf", arch=arch)
    llm = LLM(str(convert_gguf(gguf_path, tmp_path / "converted", progress=False)), progress=False)
    prompts = random_prompts([5, 40], seed=3)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for p, out in zip(prompts, outs, strict=True):
        hf.generation_config.eos_token_id = None
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
        assert out.token_ids == ref
    # The conversion is an ordinary HF checkpoint (experts one by one, HF names): transformers reads it.
    converted = load_hf(tmp_path / "converted")
    ids = torch.tensor([prompts[1]])
    assert rel_err(converted(ids).logits, hf(ids).logits) < 1e-5


def test_triton_backend_matches_hf(model_dir, monkeypatch):
    """The GPU path end to end (Triton attention and grouped GEMM), in the interpreter without a GPU."""
    monkeypatch.setenv("TESSERA_ATTENTION_BACKEND", "triton")
    path = model_dir("qwen2_moe")
    llm = LLM(str(path), progress=False, max_model_len=128, kv_cache_memory=8 << 20)
    assert llm.engine.runner.backend.name == "triton"
    hf = load_hf(path)
    prompts = random_prompts([3, 21], seed=4)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    for p, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False)[0, len(p):].tolist()


class _CountingExecutor(ExpertExecutor):
    """The local executor, counting the rows each layer sends; `zero` drops the experts' output."""

    def __init__(self, zero: bool = False):
        self.rows: dict[int, int] = {}
        self.zero = zero

    def __call__(self, block, x, routing: Routing, ops):
        self.rows[block.layer_idx] = self.rows.get(block.layer_idx, 0) + routing.topk_ids.numel()
        out = super().__call__(block, x, routing, ops)
        return torch.zeros_like(out) if self.zero else out


def test_expert_executor_seam(model_dir):
    llm = LLM(str(model_dir("qwen2_moe")), progress=False)
    prompt = random_prompts([11], seed=5)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    base = llm.generate(prompt, params, use_tqdm=False)[0].token_ids
    counting = _CountingExecutor()
    assert set_expert_executor(llm.engine.model, counting) == 2  # layers 0 and 2; layer 1 is dense
    assert llm.generate(prompt, params, use_tqdm=False)[0].token_ids == base
    # Every token of every step went through the executor of each sparse layer, top-3 pairs each.
    assert counting.rows == {0: 3 * (11 + 5), 2: 3 * (11 + 5)}
    set_expert_executor(llm.engine.model, _CountingExecutor(zero=True))
    assert llm.generate(prompt, params, use_tqdm=False)[0].token_ids != base


@pytest.mark.parametrize("option", [{"enable_lora": True}, {"weight_memory": 1 << 20}, {"quantization": "bits:4"}])
def test_moe_refuses_dense_only_features(model_dir, option):
    with pytest.raises(InvalidRequestError, match="mixture of experts"):
        LLM(str(model_dir("qwen3_moe")), progress=False, **option)


def test_sharded_per_expert_checkpoint_loads(tmp_path):
    """Sharded safetensors (an index), as large MoE checkpoints come: experts split over shards."""
    from transformers import AutoModelForCausalLM

    cfg = make_hf_config("mixtral")
    torch.manual_seed(6)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    llm = LLM(str(tmp_path), progress=False)
    p = random_prompts([13], seed=6)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    hf.generation_config.eos_token_id = None
    assert out.token_ids == hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist()


def test_gguf_q8_0_stacked_experts(tmp_path):
    """Quantized stacked experts ([E, F, H] blocks along H) dequantize to the weights they encode."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import quants as gq
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    hf = AutoModelForCausalLM.from_config(make_hf_config("qwen3_moe", moe_intermediate_size=64)).eval()
    gguf_path = write_gguf(hf, tmp_path / "q8.gguf", Q.Q8_0, arch="qwen3_moe")

    def q8(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x)
        return gq.dequantize(gq.quantize(x, Q.Q8_0), Q.Q8_0).reshape(x.shape)

    with torch.no_grad():  # the reference: the same rounding applied to HF's own weights
        for name, p in hf.named_parameters():
            if p.ndim >= 2:
                x = p.numpy()
                if name.endswith("experts.gate_up_proj"):  # quantized as separate gate and up tensors
                    x = np.concatenate([q8(h) for h in np.split(x, 2, axis=1)], axis=1)
                p.copy_(torch.from_numpy(q8(x) if not name.endswith("experts.gate_up_proj") else x))
    llm = LLM(str(convert_gguf(gguf_path, tmp_path / "converted", progress=False)), progress=False)
    p = random_prompts([25], seed=7)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    hf.generation_config.eos_token_id = None
    assert out.token_ids == hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p):].tolist()


def test_stacked_expert_checkpoint_loads(tmp_path):
    """A checkpoint that stores each layer's experts stacked (transformers' in-memory layout,
    `mlp.experts.gate_up_proj` [E, 2F, H]) loads as well as one with experts one by one."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cfg = make_hf_config("qwen3_moe", tie_word_embeddings=False)
    torch.manual_seed(8)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    cfg.architectures = [type(hf).__name__]
    cfg.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    llm = LLM(str(tmp_path), progress=False)
    p = random_prompts([13], seed=8)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    hf.generation_config.eos_token_id = None
    assert out.token_ids == hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist()
