"""Shared fixtures: tiny random-weight checkpoints of every supported architecture (no downloads)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# dtype="auto" means bfloat16 on CPUs with native bf16; the suite's exactness reference is float32.
# Tests of bf16 and of what "auto" picks ask for them explicitly.
os.environ.setdefault("TESSERA_AUTO_CPU_DTYPE", "float32")
if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU; the variable must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Tests marked gpu (`make test-gpu`; the default suite deselects them) fail, not skip, where torch
    sees no CUDA device: a GPU suite that passes by skipping everything would hide that nothing ran."""
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.fail("marked gpu: needs a CUDA GPU and torch sees none (run `make test-gpu` on a machine "
                    "with one)", pytrace=False)

# Small but not degenerate: GQA, odd prompt lengths, enough heads to make head grouping matter.
BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False)

# name -> (config class name, overrides)
ARCHS = {
    "llama": ("LlamaConfig", {}),
    "llama3_rope": ("LlamaConfig", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 128},
                                    "rope_theta": 500000.0}),
    "llama_mqa_tied": ("LlamaConfig", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 96}),
    "qwen3": ("Qwen3Config", {"head_dim": 40, "num_attention_heads": 4, "num_key_value_heads": 4}),
    "qwen3_gqa8": ("Qwen3Config", {"head_dim": 16, "num_attention_heads": 8, "num_key_value_heads": 1,
                                   "tie_word_embeddings": True}),
}

# Mixtures of experts (tessera/models/moe.py), kept apart from ARCHS: the suites over ARCHS exercise
# features (quantization, offload, LoRA) that take dense models. Enough experts and tokens that every
# expert is hit; Qwen2-MoE with its shared expert and one dense layer (mlp_only_layers).
MOE_ARCHS = {
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96,
                                  "sliding_window": None}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 48,
                                     "shared_expert_intermediate_size": 80, "norm_topk_prob": False,
                                     "num_hidden_layers": 3, "mlp_only_layers": [1]}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                                     "norm_topk_prob": True, "head_dim": 16, "tie_word_embeddings": True}),
}


def make_hf_config(arch: str, **overrides):
    import transformers

    cls_name, arch_overrides = ARCHS[arch] if arch in ARCHS else MOE_ARCHS[arch]
    kwargs = {**BASE, **arch_overrides, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


def save_random_model(path: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """Builds a random-weight HF model of `arch` and saves it (config.json + model.safetensors)."""
    from transformers import AutoModelForCausalLM

    cfg = make_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A factory: model_dir(arch) -> path of a saved random checkpoint (built once per session)."""
    cache: dict[str, Path] = {}

    def get(arch: str = "llama") -> Path:
        if arch not in cache:
            cache[arch] = save_random_model(tmp_path_factory.mktemp(arch), arch)
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """saved_models(arch, **overrides): a random-weight model of that shape, saved once per module."""
    cache = {}

    def get(arch: str, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = save_random_model(tmp_path_factory.mktemp(arch), arch, **overrides)
        return cache[key]

    return get


@pytest.fixture
def pack_dir(tmp_path, monkeypatch):
    """Weight-streaming layer packs go under the test's own tmp dir, never the user's cache."""
    monkeypatch.setenv("TESSERA_OFFLOAD_DIR", str(tmp_path / "packs"))
    return tmp_path / "packs"


@pytest.fixture(scope="session")
def kernels():
    """tessera's C++ CPU kernels; the suites that test them fail, never skip, where they do not build."""
    from tessera.ops.cpu_kernels import cpu_kernels

    module = cpu_kernels()
    if module is None:
        pytest.fail("tessera's C++ CPU kernels did not build on this machine (see the log for why)")
    return module


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def random_prompts(lengths, vocab: int = 512, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max()).item()


def check_logits_at_every_position(llm, hf, prompts, tolerance: float = 1e-4) -> None:
    """Prefill every prompt in one flat batch through llm's runner and compare the logits of every
    position with HF's model run on that prompt alone; the blocks go back afterwards."""
    from tessera import SamplingParams
    from tessera.engine.scheduler import ScheduledSeq
    from tessera.engine.sequence import Sequence

    engine = llm.engine
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
        assert rel_err(got, ref) < tolerance, item.num_new_tokens
    for s in seqs:
        engine.block_manager.free_seq(s)
    assert engine.block_manager.num_used_blocks == 0


def prompt_logits(llm, prompt: list[int]) -> torch.Tensor:
    """The logits of every position of `prompt` (one prefill step through the engine's runner)."""
    from tessera import SamplingParams

    eng = llm.engine
    rid = eng.add_request(prompt, SamplingParams(max_tokens=1))
    plan = eng.scheduler.schedule()
    logits = eng.runner.run(plan.scheduled, all_rows=True)
    eng.abort(rid)
    return logits


def assert_same_greedy(got, want, tolerance: float = 1e-5) -> None:
    """Two runs' RequestOutputs: the same tokens, the same top-logprob keys, logprobs within tolerance."""
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs, strict=True):
            assert lg.keys() == lw.keys()
            for t in lw:
                assert abs(lg[t].logprob - lw[t].logprob) < tolerance


class ThreadServer:
    """uvicorn on an already-bound loopback socket, in a background thread (the server suites):
    `with ThreadServer(app) as url: ...`."""

    def __init__(self, app):
        import uvicorn  # a serve dependency: imported here so that suites without a server need none

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


API_KEY = "test-key"
SERVED_NAMES = ["tessera-test", "SmolLM2-135M-Instruct"]
# A --chat-template given as the template itself (not the model's): the server suites check it is used.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}: {{ m.content }}<|im_end|>\\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")


@pytest.fixture(scope="session")
def keyed_server():
    """The default model behind a server started as `tessera serve --api-key test-key
    --served-model-name tessera-test SmolLM2-135M-Instruct --chat-template '<CHAT_TEMPLATE>'`:
    yields (url, LLM); requests need `Authorization: Bearer test-key`."""
    from tessera import LLM
    from tessera.serve.app import build_app
    from tessera.serve.async_engine import AsyncEngine
    from tessera.tokenizer import load_chat_template

    llm = LLM(progress=False, max_model_len=1024, kv_cache_memory=128 << 20, max_num_seqs=16)
    app = build_app(AsyncEngine(llm.engine), SERVED_NAMES, api_key=API_KEY,
                    chat_template=load_chat_template(CHAT_TEMPLATE))
    with ThreadServer(app) as url:
        yield url, llm


@pytest.fixture(scope="session")
def tool_server():
    """The default model behind `tessera serve --tool-call-parser hermes` (no API key): yields (url, LLM),
    for the structured-output and tool-calling suites."""
    from tessera import LLM
    from tessera.serve.app import build_app
    from tessera.serve.async_engine import AsyncEngine

    llm = LLM(progress=False, max_model_len=2048, kv_cache_memory=256 << 20, max_num_seqs=32)
    with ThreadServer(build_app(AsyncEngine(llm.engine), "SmolLM2-135M-Instruct", tool_call_parser="hermes")) as url:
        yield url, llm


def save_random_lora(base: Path, out: Path, r: int = 4, alpha: float = 8.0, seed: int = 0,
                     targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                     use_rslora: bool = False, scale: float = 0.3) -> Path:
    """A PEFT LoRA adapter for the checkpoint at `base` with random A and B (PEFT starts B at zero,
    which would make the adapter a no-op), saved as adapter_config.json + adapter_model.safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                            use_rslora=use_rslora, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
    peft.save_pretrained(out)
    return out


def load_hf_merged(base: Path, adapter: Path):
    """The HF model at `base` with the PEFT adapter merged into its weights (the reference)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_hf(base), str(adapter)).merge_and_unload()
    return model.eval()


@pytest.fixture(scope="session")
def lora_dir(model_dir, tmp_path_factory):
    """lora_dir(arch, seed, **kw) -> a saved random adapter for model_dir(arch) (built once per key)."""
    cache: dict = {}

    def get(arch: str = "llama", seed: int = 0, **kw) -> Path:
        key = (arch, seed, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = save_random_lora(model_dir(arch), tmp_path_factory.mktemp(f"lora-{arch}-{seed}"),
                                          seed=seed, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def default_llm():
    """The default model (SmolLM2-135M-Instruct) with a 2,048-token window, shared by the long-context
    tests that need a real model's judgement."""
    from tessera import LLM

    return LLM(progress=False, max_model_len=2048)
