"""The block store: the variants' weights cut into blocks, each distinct block kept once.

A *block* is one weight-holding module of the model as tessera builds it: a decoder layer's fused
q/k/v, o, fused gate/up or down projection (weight and bias together), one of its RMSNorms, the
final norm, the embeddings, an untied LM head. The first variant is loaded as the engine's model;
every other variant's checkpoint is read through the same loader mapping, converted to the compute
dtype, and each of its blocks is hashed (xxh3-128 of the bytes, with shape and dtype): a block equal
to the first variant's is not kept at all, one equal to another variant's is kept once. Only blocks
that differ somewhere get per-variant versions (tessera.blockllm.runtime runs them).

Each variant also gets a prefix-cache salt: the hash chain of the blocks its KV depends on (everything
computed before the last layer's K and V: the embeddings, and each layer's norms and projections up
to the last layer's q/k/v). Variants equal on those blocks share KV (the salt is the first variant's,
None); any difference starts a separate chain, so KV never crosses variants whose earlier blocks differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import xxhash
from torch import nn

from tessera.config import ModelConfig, parse_models  # noqa: F401  (re-exported)
from tessera.errors import InvalidRequestError, ModelLoadError
from tessera.models.llama import LlamaForCausalLM
from tessera.ops.linear import Linear
from tessera.ops.norm import RMSNorm

log = logging.getLogger(__name__)

# ModelConfig fields that may differ between variants (they do not change a block's shape or math).
_FREE_FIELDS = {"max_position_embeddings", "bos_token_id", "eos_token_ids"}


@dataclass
class Variant:
    """One served model: its name (the request's `model`), its checkpoint and its index (rows of a
    step are grouped by it); `cache_salt` seeds its prefix-cache chain (None: the first variant's)."""

    name: str
    path: str
    index: int
    cache_salt: int | None = None


@dataclass
class Block:
    """A module shared by all variants, and what each variant runs there: `versions[version_of[v]]`
    (a dict of the module's parameter tensors; version 0 is the module's own, the first variant's)."""

    name: str
    module: nn.Module
    versions: list[dict[str, torch.Tensor]]
    version_of: list[int]


@dataclass
class VariantSet:
    variants: list[Variant]
    blocks: dict[str, Block]  # every block of the model, by module name
    stats: dict = field(default_factory=dict)

    def by_name(self, name: str | None) -> Variant:
        if name is None:
            return self.variants[0]
        for v in self.variants:
            if v.name == name:
                return v
        raise InvalidRequestError(f"the model `{name}` does not exist; this engine serves "
                                  + ", ".join(f"`{v.name}`" for v in self.variants))

    @property
    def differing(self) -> list[Block]:
        return [b for b in self.blocks.values() if len(b.versions) > 1]


def block_modules(model: LlamaForCausalLM) -> list[tuple[str, nn.Module]]:
    """The model's blocks in forward order (a tied LM head is the embeddings' block, not its own)."""
    tied = model.cfg.tie_word_embeddings
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear | RMSNorm | nn.Embedding)
            and not (tied and n == "lm_head")]


def _params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach() for k, p in m._parameters.items() if p is not None}


def block_hash(tensors: dict[str, torch.Tensor]) -> int:
    h = xxhash.xxh3_128()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.intdigest()


def check_same_architecture(name: str, path: Path, cfg: ModelConfig, first: ModelConfig, first_name: str) -> None:
    diff = [f.name for f in fields(ModelConfig) if f.name not in _FREE_FIELDS
            and getattr(cfg, f.name) != getattr(first, f.name)]
    if diff:
        detail = ", ".join(f"{d} {getattr(cfg, d)!r} vs {getattr(first, d)!r}" for d in diff[:4])
        raise ModelLoadError(f"model {name!r} at {str(path)!r} is not the architecture of {first_name!r} ({detail}): "
                             f"block sharing takes fine-tunes of one architecture and shape")


def _kv_blocks(names: list[str], num_layers: int) -> list[str]:
    """The blocks every layer's K and V depend on: all of them up to the last layer's k_norm / qkv."""
    last = f"layers.{num_layers - 1}.self_attn."
    end = max(i for i, n in enumerate(names) if n.startswith(last) and ("qkv_proj" in n or "k_norm" in n))
    return names[:end + 1]


def load_variants(models: dict[str, str], model: LlamaForCausalLM, cfg: ModelConfig, dtype: torch.dtype,
                  device: torch.device, progress: bool = False) -> VariantSet:
    """`model`: the first variant, loaded. Reads the other variants, keeps their distinct blocks."""
    from tessera.models.loader import _read_tensors, _safetensors_files, gather_part, map_hf_name, resolve_model_path

    items = list(models.items())
    first_name = items[0][0]
    mods = block_modules(model)
    names = [n for n, _ in mods]
    blocks = {n: Block(n, m, [_params(m)], [0]) for n, m in mods}
    hashes = {n: [block_hash(b.versions[0])] for n, b in blocks.items()}
    kv_names = _kv_blocks(names, cfg.num_layers)
    first_kv = [hashes[n][0] for n in kv_names]
    variants = [Variant(first_name, items[0][1], 0, None)]
    for index, (name, raw_path) in enumerate(items[1:], start=1):
        path = resolve_model_path(raw_path)
        check_same_architecture(name, path, ModelConfig.from_dir(path), cfg, first_name)
        params: dict[str, torch.Tensor] = {}
        pending: dict[str, list] = {}
        for hf_name, tensor in _read_tensors(_safetensors_files(path), progress):
            target, part = map_hf_name(hf_name, cfg)
            if target is None:
                continue
            if part is not None:
                parts = gather_part(pending, target, part, tensor)
                if parts is None:
                    continue
                tensor = torch.cat(parts, dim=0)
            params[target] = tensor
        chosen: list[int] = []
        for n, b in blocks.items():
            mine = {}
            for k, p in b.versions[0].items():
                t = params.pop(f"{n}.{k}", None)
                if t is None:
                    raise ModelLoadError(f"model {name!r} at {str(path)!r} is missing weight {n}.{k}")
                if tuple(t.shape) != tuple(p.shape):
                    raise ModelLoadError(f"model {name!r}: weight {n}.{k} has shape {tuple(t.shape)}, "
                                         f"{first_name!r} has {tuple(p.shape)}")
                mine[k] = t.to(device=device, dtype=p.dtype)
            h = block_hash(mine)
            if h in hashes[n]:
                version = hashes[n].index(h)
            else:
                version = len(b.versions)
                b.versions.append(mine)
                hashes[n].append(h)
            b.version_of.append(version)
            chosen.append(hashes[n][version])
        if params:
            raise ModelLoadError(f"model {name!r} at {str(path)!r} has weights {sorted(params)[:4]} that "
                                 f"{first_name!r} has not")
        kv = [chosen[names.index(n)] for n in kv_names]
        salt = None
        if kv != first_kv:
            salt = xxhash.xxh3_64_intdigest(b"variant\0" + b"".join(x.to_bytes(16, "little") for x in kv))
        variants.append(Variant(name, raw_path, index, salt))
    nbytes = {n: [sum(t.numel() * t.element_size() for t in v.values()) for v in b.versions]
              for n, b in blocks.items()}
    stats = {"variants": len(variants), "blocks_per_variant": len(blocks),
             "blocks_stored": sum(len(b.versions) for b in blocks.values()),
             "blocks_separate": len(blocks) * len(variants),
             "blocks_differing": sum(len(b.versions) > 1 for b in blocks.values()),
             "weight_bytes_stored": sum(sum(v) for v in nbytes.values()),
             "weight_bytes_separate": sum(sum(nbytes[n][b.version_of[i]] for n, b in blocks.items())
                                          for i in range(len(variants)))}
    log.info("block sharing: %d variants, %d of %d blocks stored (%d differ somewhere), %.1f of %.1f MiB",
             len(variants), stats["blocks_stored"], stats["blocks_separate"], stats["blocks_differing"],
             stats["weight_bytes_stored"] / 2**20, stats["weight_bytes_separate"] / 2**20)
    return VariantSet(variants, blocks, stats)
