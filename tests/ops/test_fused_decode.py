"""The C++ decode stack (tessera/ops/fused_decode.py) gives the Python layers' results bit for bit, and
steps it cannot describe keep the Python path."""

import pytest

from tessera import LLM, SamplingParams
from tessera.ops.cpu_kernels import cpu_kernels
from tessera.ops.fused_decode import build_decode_stack
from tessera.ops.linear import LinearMethod

PROMPTS = [[5, 17, 99, 3], [200, 1, 45, 67, 89, 11, 23], [7] * 40]


def run(llm, monkeypatch, fused: bool):
    monkeypatch.setenv("TESSERA_FUSED_DECODE", "1" if fused else "0")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "llama_mqa_tied"])
@pytest.mark.parametrize("kw", [dict(dtype="float32"), dict(dtype="bfloat16"),
                                dict(dtype="float32", quantization="bits:4"),
                                dict(dtype="bfloat16", quantization="bits:3", quantization_group_size=32),
                                dict(dtype="float32", quantization="bits:4", activation_bits=8)],
                         ids=["fp32", "bf16", "fp32-bits4", "bf16-bits3", "fp32-bits4-a8"])
def test_decode_stack_equals_the_python_layers(model_dir, monkeypatch, arch, kw):
    # No prefix cache: a cached prompt's last token would be computed as a decode in one run only.
    llm = LLM(str(model_dir(arch)), enable_prefix_caching=False, progress=False, **kw)
    fused = run(llm, monkeypatch, True)
    assert llm.engine.runner.backend._stacks.stack is not None  # the stack did run
    assert fused == run(llm, monkeypatch, False)


def test_batches_past_the_gemm_threshold_use_the_blockwise_path_identically(model_dir, monkeypatch):
    """Enough decodes at once for BitsLinearMethod's dequantize-then-GEMM path (gemm_from_rows)."""
    llm = LLM(str(model_dir("qwen2")), dtype="float32", quantization="bits:4", enable_prefix_caching=False,
              progress=False)
    prompts = [[i + 3, 2 * i + 5, 11] for i in range(40)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=3)

    def go(fused):
        monkeypatch.setenv("TESSERA_FUSED_DECODE", "1" if fused else "0")
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params,
                                                                                     use_tqdm=False)]

    assert go(True) == go(False)


def test_unknown_linear_methods_and_hooks_keep_the_python_path(model_dir):
    """A linear method that does not describe itself (a LoRA wrapper, say) or a module hook must not
    be skipped by the C++ stack."""

    class Scaled(LinearMethod):
        def apply(self, layer, x):
            return 2 * super().apply(layer, x)

    llm = LLM(str(model_dir("llama")), dtype="float32", progress=False)
    model, kv = llm.engine.model, llm.engine.runner.kv_caches
    stack_cls = cpu_kernels().DecodeStack
    assert build_decode_stack(stack_cls, model, kv) is not None
    layer = model.layers[1].mlp.down_proj
    original = layer.method
    layer.method = Scaled()
    assert build_decode_stack(stack_cls, model, kv) is None
    layer.method = original
    handle = model.layers[0].register_forward_hook(lambda *a: None)
    assert build_decode_stack(stack_cls, model, kv) is None
    handle.remove()
    assert build_decode_stack(stack_cls, model, kv) is not None


def test_stack_follows_a_changed_method(model_dir, monkeypatch):
    """The cached stack is rebuilt when a layer's method changes (e.g. adapters enabled after load)."""
    llm = LLM(str(model_dir("llama")), dtype="float32", enable_prefix_caching=False, progress=False)
    before = run(llm, monkeypatch, True)

    class Doubled(LinearMethod):
        def apply(self, layer, x):
            return 2 * super().apply(layer, x)

    for layer in llm.engine.model.layers:
        layer.mlp.down_proj.method = Doubled()
    after = run(llm, monkeypatch, True)
    assert llm.engine.runner.backend._stacks.stack is None and after != before
    assert after == run(llm, monkeypatch, False)


def test_lora_engines_fuse_every_decode_step(model_dir, lora_dir, monkeypatch):
    """With LoRA enabled the stack runs the steps that have no adapter rows (the base product) and the
    ones that have (the step's plan handed over by LoRALinearMethod.prepare_fused_step); both give what
    the Python layers give."""
    from tessera import LoRARequest

    llm = LLM(str(model_dir("llama")), dtype="float32", enable_lora=True, max_loras=2,
              enable_prefix_caching=False, progress=False)
    backend = llm.engine.runner.backend
    used = []
    real_get = backend._stacks.get
    monkeypatch.setattr(backend._stacks, "get", lambda *a: used.append(real_get(*a)) or used[-1])
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3)
    adapter = LoRARequest("a", 1, str(lora_dir("llama")))

    def go(fused, lora_request):
        monkeypatch.setenv("TESSERA_FUSED_DECODE", "1" if fused else "0")
        used.clear()
        outs = llm.generate(PROMPTS, params, use_tqdm=False, lora_request=lora_request)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs], list(used)

    base, calls = go(True, None)
    assert calls and all(s is not None for s in calls)  # every decode step fused
    assert base == go(False, None)[0]
    with_adapter, calls = go(True, adapter)
    assert calls and all(s is not None for s in calls)  # every decode step has adapter rows, and is fused
    assert with_adapter == go(False, adapter)[0] and with_adapter != base


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_decode_steps_in_the_stack_equal_the_python_layers(model_dir, lora_dir, monkeypatch, dtype):
    """Decode steps with adapter rows run in the stack too (LoRA's plan handed over each step): its padded
    group (three or more adapters) and its segments (one or two) give the Python method's bits."""
    from tessera import LoRARequest

    base = model_dir("llama")
    reqs = [LoRARequest(f"a{k}", k + 1, str(lora_dir("llama", seed=40 + k, r=4 * (k % 2 + 1)))) for k in range(4)]
    llm = LLM(str(base), dtype=dtype, enable_lora=True, max_loras=4, max_lora_rank=8, enable_prefix_caching=False,
              progress=False)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5)
    prompts = [[i + 3, 2 * i + 5, 11, 40 + i] for i in range(10)]

    def go(fused, spread):
        monkeypatch.setenv("TESSERA_FUSED_DECODE", "1" if fused else "0")
        outs = llm.generate(prompts, params, use_tqdm=False, lora_request=[reqs[k] if k is not None else None
                                                                            for k in spread])
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]

    stacks = llm.engine.runner.backend._stacks
    for spread in ([0, 1, 2, 3, None, 0, 1, 2, 3, None], [0, 0, 0, 1, 1, None, None, 0, 1, 0]):
        fused = go(True, spread)
        assert stacks.stack is not None and stacks.step_checks  # the LoRA method was asked, the stack ran
        assert fused == go(False, spread)
