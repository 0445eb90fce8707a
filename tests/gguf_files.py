"""Tiny GGUF files for tests: a random HF model written the way llama.cpp's converter writes it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

# HF suffix -> GGUF layer tensor name (inverse of tessera.models.gguf._LAYER_NAMES)
_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
# tessera/HF arch name -> llama.cpp's (Mixtral is a "llama" with experts, q/k permuted like Llama).
_GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf: str) -> str:
    if ".mlp.experts." in hf:  # stacked experts, split into gate/up/down (write_gguf): llama.cpp's *_exps
        _, _, layer, rest = hf.split(".", 3)
        return f"blk.{layer}.ffn_{rest.removeprefix('mlp.experts.').removesuffix('_proj')}_exps.weight"
    base, kind = hf.rsplit(".", 1)
    if base in _GLOBAL:
        return f"{_GLOBAL[base]}.{kind}"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[rest]}.{kind}"


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_model(arch: str = "llama", tied: bool = False, hidden: int = 64, inter: int = 128, vocab: int = 320,
               layers: int = 2):
    torch.manual_seed(0)
    common = dict(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=hidden // 4, **common))
    elif arch == "qwen2":  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # norms are ones at init: randomize so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def write_gguf(model, path: Path, qtype: Q = Q.F32, arch: str = "llama", raw: dict | None = None) -> Path:
    """Write ``model`` like llama.cpp: permuted q/k (llama), 1-D tensors in F32, others as ``qtype``.

    ``raw`` maps HF names to (bytes, type) to store instead (for types gguf can't quantize).
    """
    cfg = model.config
    moe = arch in _GGUF_ARCH
    if moe:  # llama.cpp's experts: ffn_{gate,up,down}_exps [E, F, H]; its q/k permutation for Mixtral
        arch = _GGUF_ARCH[arch]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    if arch == "qwen3":
        w.add_key_length(cfg.head_dim)
    elif arch == "llama":
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    tensors = dict(model.state_dict())
    if moe:
        num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
        w.add_expert_count(num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if arch != "llama":
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", 0):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
        if arch == "qwen3moe":
            w.add_key_length(cfg.head_dim)
        for name in [n for n in tensors if n.endswith("mlp.experts.gate_up_proj")]:
            gate, up = tensors.pop(name).chunk(2, dim=1)
            tensors[name.replace("gate_up_proj", "gate_proj")] = gate
            tensors[name.replace("gate_up_proj", "up_proj")] = up
    for name, t in tensors.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        x = t.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            x = permute_qk(x, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            x = permute_qk(x, cfg.num_key_value_heads)
        if raw and name in raw:
            data, t_type = raw[name]
            w.add_tensor(gguf_name(name), data, raw_shape=data.shape, raw_dtype=t_type)
        elif x.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(x))
        else:
            q = gq.quantize(np.ascontiguousarray(x), qtype)
            w.add_tensor(gguf_name(name), q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# Byte offsets of each block type's fp16 fields: (scale d, minimum dmin or None). Everything else in a
# block is codes and sub-scales, for which any byte is valid.
_FP16_FIELDS = {"Q4_0": (0, None), "Q5_0": (0, None), "Q8_0": (0, None), "Q4_1": (0, 2), "Q5_1": (0, 2),
                "Q4_K": (0, 2), "Q5_K": (0, 2), "Q2_K": (80, 82), "Q3_K": (108, None), "Q6_K": (208, None)}


def random_blocks(qtype: str, n: int, k: int, rng: np.random.Generator, scale: float = 0.05) -> np.ndarray:
    """Raw bytes of an [n, k] weight of block type `qtype` (gguf's Python code can only quantize some
    types): random codes and sub-scales, finite random fp16 scales."""
    t = Q[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    data = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
    d_at, m_at = _FP16_FIELDS[qtype]
    data[:, d_at:d_at + 2] = rng.uniform(-scale, scale, len(data)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if m_at is not None:
        data[:, m_at:m_at + 2] = rng.uniform(0, scale, len(data)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return data.reshape(n, -1)
