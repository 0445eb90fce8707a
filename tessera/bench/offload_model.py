"""A random-weight Llama-shaped checkpoint written layer by layer (one safetensors shard per layer, plus an
index), so that a model larger than memory can be built without ever holding it: `tessera bench offload`
and the weight-streaming tests use it. The weights are small normal values (std 0.02), as an initialised
model's; nothing here downloads."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

GiB = 1 << 30


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 10
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    vocab_size: int = 32000
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    @property
    def layer_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        return h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h

    @property
    def params(self) -> int:
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return emb + self.num_hidden_layers * self.layer_params + self.hidden_size

    def with_size(self, target_bytes: int, dtype_bytes: int) -> LlamaShape:
        """This shape with as many layers as bring the checkpoint to at least `target_bytes`."""
        emb = (self.params - self.num_hidden_layers * self.layer_params) * dtype_bytes
        layers = max(1, -(-(target_bytes - emb) // (self.layer_params * dtype_bytes)))
        return LlamaShape(**{**asdict(self), "num_hidden_layers": int(layers)})


def _randn(shape, dtype, gen) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def write_random_llama(out: Path, shape: LlamaShape, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Writes config.json, model-XXXXX.safetensors shards (embeddings; one per layer; norm and LM head) and
    model.safetensors.index.json into `out`; returns `out`. Skips the work if `out` holds a complete one."""
    from safetensors.torch import save_file

    out = Path(out)
    index = out / "model.safetensors.index.json"
    if index.is_file() and (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    h, i, n = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    kv = h // shape.num_attention_heads * shape.num_key_value_heads
    weight_map: dict[str, str] = {}
    total = n + 2

    def flush(k: int, tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})

    flush(0, {"model.embed_tokens.weight": _randn((shape.vocab_size, h), dtype, gen)})
    for layer in range(n):
        p = f"model.layers.{layer}."
        flush(layer + 1, {
            p + "self_attn.q_proj.weight": _randn((h, h), dtype, gen),
            p + "self_attn.k_proj.weight": _randn((kv, h), dtype, gen),
            p + "self_attn.v_proj.weight": _randn((kv, h), dtype, gen),
            p + "self_attn.o_proj.weight": _randn((h, h), dtype, gen),
            p + "mlp.gate_proj.weight": _randn((i, h), dtype, gen),
            p + "mlp.up_proj.weight": _randn((i, h), dtype, gen),
            p + "mlp.down_proj.weight": _randn((h, i), dtype, gen),
            p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
        })
    last = {"model.norm.weight": torch.ones(h, dtype=dtype)}
    if not shape.tie_word_embeddings:
        last["lm_head.weight"] = _randn((shape.vocab_size, h), dtype, gen)
    flush(n + 1, last)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": i, "num_hidden_layers": n, "num_attention_heads": shape.num_attention_heads,
              "num_key_value_heads": shape.num_key_value_heads, "vocab_size": shape.vocab_size,
              "max_position_embeddings": shape.max_position_embeddings, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": shape.tie_word_embeddings, "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": str(dtype).removeprefix("torch."),
              "attention_bias": False, "mlp_bias": False}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    size = sum((out / f).stat().st_size for f in set(weight_map.values()))
    index.write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
    return out


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
