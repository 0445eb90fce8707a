"""The reference random-weight model of DESIGN.md (Qwen3 shape, 32.5M parameters), built without files
from the network: transformers' config class, random init, saved as safetensors.

`qwen3-moe` is its mixture-of-experts sibling (issue 20's CPU benchmark): the same attention and
vocabulary, each MLP 8 experts of width 512 with the top 2 taken (Qwen3-MoE routing, renormalised),
64.0M parameters of which 26.3M are active per token (tied embeddings counted once)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

REFERENCE_MODEL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                       head_dim=64, intermediate_size=1536, vocab_size=16384, tie_word_embeddings=True,
                       max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)

QWEN3_0_6B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
                  max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  bos_token_id=151643, eos_token_id=151645)

QWEN3_MOE = dict(REFERENCE_MODEL, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512,
                 norm_topk_prob=True)

# shape -> (transformers config class, its arguments)
SHAPES = {"reference": ("Qwen3Config", REFERENCE_MODEL), "qwen3-0.6b": ("Qwen3Config", QWEN3_0_6B),
          "qwen3-moe": ("Qwen3MoeConfig", QWEN3_MOE)}


def build_random_model(shape: str = "reference", out_dir: str | Path | None = None, seed: int = 0) -> Path:
    import transformers
    from transformers import AutoModelForCausalLM

    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix=f"tessera-{shape}-"))
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    config_class, kwargs = SHAPES[shape]
    model = AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**kwargs), dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out
