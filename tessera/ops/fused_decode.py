"""The decoder layers of a decode-only step in one C++ call (tessera/ops/csrc/decode_stack.cpp).

A single-stream token of a small model spends about as long in the Python around the kernels (some 25
interpreted calls per layer: slicing, allocation, argument checks) as in the kernels themselves. When a
step's rows are all one-token decodes, CpuKernelBackend hands the whole stack of layers to a C++
DecodeStack built once per model: the same kernels in the same order, so the same bits (the tests
compare logits with torch.equal), minus the interpreter.

The stack is described once from the model: per layer its norms, its KV cache and its four linears,
each as its LinearMethod says it multiplies (`LinearMethod.decode_op`); a method whose product changes
from step to step says on which steps the stack computes it (`fused_step_ok`) and hands the stack each
step's inputs (`prepare_fused_step`: LoRA's row plan, applied by the stack's linears as the Python
method applies it). A method that cannot say
(one it does not know, a layer with hooks, sparse or observed steps) keeps the Python path; so does
TESSERA_FUSED_DECODE=0 (to compare).
"""

from __future__ import annotations

import operator
import os

import torch

from tessera.ops.linear import LinearMethod


class DecodeStackCache:
    """The DecodeStack of a model, rebuilt when a layer's linear method, a weight or the KV cache changes.

    Checked every decode step, so the check reads the watched slots straight from the modules'
    dictionaries: going through nn.Module attribute lookup for every linear and norm cost ~0.9 ms a
    step on the 30-layer default model, a tenth of a single-stream token."""

    def __init__(self, kernels):
        self.kernels = kernels
        self.model = None
        self.kv_ptr = None
        # The watched slots: (modules' dicts, names, the objects they held), three parallel lists.
        self.watched: tuple[list[dict], list[str], list[object]] = ([], [], [])
        self.stack = None
        self.step_checks: list = []

    def get(self, model, kv_caches):
        if os.environ.get("TESSERA_FUSED_DECODE", "1") == "0" or not hasattr(self.kernels, "DecodeStack"):
            return None
        if not all(getattr(layer, "fusable", False) for layer in model.layers):  # see build_decode_stack
            return None
        if (self.model is not model or self.kv_ptr != kv_caches[0][0].data_ptr()
                or not all(map(operator.is_, map(dict.get, *self.watched[:2]), self.watched[2]))):
            self._build(model, kv_caches)
        if self.stack is None or not all(m.fused_step_ok() for m in self.step_checks):
            return None
        for m in self.step_checks:
            m.prepare_fused_step(self.stack)
        return self.stack

    def _build(self, model, kv_caches) -> None:
        self.model, self.kv_ptr = model, kv_caches[0][0].data_ptr()
        self.stack = build_decode_stack(self.kernels.DecodeStack, model, kv_caches)
        # What the stack holds: a new method, weight or norm (adapters, reloaded weights) means a new stack.
        linears = list(_linears(model))
        slots = [(d, name) for m in linears
                 for d, name in ((m.__dict__, "method"), (m._parameters, "weight"),
                                 (m.__dict__, "packed_weight"), (m.__dict__, "qtiles"))]
        slots += [(n._parameters, "weight") for layer in model.layers
                  for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        # As three parallel lists, compared with map() at C speed: a generator over 540 slots cost ~0.35 ms
        # a step, a tenth of a 4-bit single-stream token on the 2-core Zen 5 EPYC.
        self.watched = ([d for d, _ in slots], [name for _, name in slots], [d.get(name) for d, name in slots])
        # Methods whose product may differ from their decode_op on some steps (LoRA's), asked each step, or
        # that hand the stack each step's inputs (LoRA's row plan, BlockLLM's variant runs).
        self.step_checks = list({id(m.method): m.method for m in linears
                                 if type(m.method).fused_step_ok is not LinearMethod.fused_step_ok
                                 or type(m.method).prepare_fused_step is not LinearMethod.prepare_fused_step}.values())


def _linears(model):
    for layer in model.layers:
        yield from (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)


def build_decode_stack(stack_cls, model, kv_caches):
    """A DecodeStack for `model` (tessera.models.llama.LlamaForCausalLM), or None when some piece has
    no C++ description."""
    cfg = model.cfg
    layers = list(model.layers)
    if not layers_run_as_written(layers):
        return None
    first = layers[0].self_attn
    stack = stack_cls(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, first.scale)
    for layer, (k_cache, v_cache) in zip(layers, kv_caches, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        ops = [m.method.decode_op(m, stack_cls) if hasattr(m.method, "decode_op") else None for m in linears]
        if any(op is None for op in ops):
            return None
        norms = (layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm, attn.k_norm)
        if any(n is not None and (n.eps != cfg.rms_norm_eps or n.per_row) for n in norms):
            return None  # the stack takes one weight per norm
        stack.add_layer(ops, layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                        None if attn.q_norm is None else attn.q_norm.weight,
                        None if attn.k_norm is None else attn.k_norm.weight, k_cache, v_cache)
    return stack


def layers_run_as_written(layers) -> bool:
    """Whether a decode step may replace these decoder layers by something computing their forward (the
    C++ stack, a CUDA graph): each says so (tessera.models.llama.DecoderLayer.fusable; a mixture of
    experts, a wrapper or a layer whose weights come and go does not), and no module hook would be
    skipped."""
    layers = list(layers)
    return (all(getattr(layer, "fusable", False) for layer in layers)
            and not any(has_hooks(m) for layer in layers for m in layer.modules()))


def has_hooks(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)
