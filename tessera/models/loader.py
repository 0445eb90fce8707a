"""Find a checkpoint, read its weights (safetensors, single or sharded; GGUF via conversion) and build
the model with fused q/k/v and gate/up weights."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from tessera.config import ModelConfig
from tessera.errors import ModelLoadError
from tessera.models.llama import LlamaForCausalLM
from tessera.models.moe import MoeForCausalLM

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# HF names fused into one of our parameters: (our suffix, part index, number of parts).
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
    "mlp.shared_expert.gate_proj": ("mlp.shared_expert.gate_up_proj", 0),  # Qwen2-MoE
    "mlp.shared_expert.up_proj": ("mlp.shared_expert.gate_up_proj", 1),
}
# One expert's projection in a checkpoint that stores experts one by one (Mixtral's w1/w3/w2, Qwen's
# gate/up/down_proj): the stacked parameter it is a slice of, and which half of gate/up (None: all).
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PART = {"w1": ("w_gate_up", 0), "gate_proj": ("w_gate_up", 0), "w3": ("w_gate_up", 1),
                "up_proj": ("w_gate_up", 1), "w2": ("w_down", None), "down_proj": ("w_down", None)}
# Checkpoints that already store the experts stacked (transformers' in-memory layout).
_STACKED = {"mlp.experts.gate_up_proj": "mlp.experts.w_gate_up", "mlp.experts.down_proj": "mlp.experts.w_down"}


@dataclass(frozen=True)
class ExpertSlice:
    """Where one expert's weight goes in a stacked [E, rows, cols] parameter: row block `half` of
    expert `expert` (the gate or up half of w_gate_up), or all its rows (half None)."""

    expert: int
    half: int | None

    def view(self, param: torch.Tensor) -> torch.Tensor:
        rows = param[self.expert]
        if self.half is None:
            return rows
        n = rows.shape[0] // 2
        return rows[self.half * n:(self.half + 1) * n]


def resolve_model_path(model: str | Path | None) -> Path:
    """A directory with config.json, or a .gguf file (converted once into the cache)."""
    if model is None:
        from tessera.models.default_model import default_model_dir

        return default_model_dir()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(model)!r} does not exist (tessera loads local files only)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model file {str(path)!r} is not a .gguf file; give a directory or a GGUF")
        from tessera.models.default_model import converted_gguf_dir

        return converted_gguf_dir(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {str(path)!r} has no config.json")
    return path


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"corrupt safetensors index {index}: {e!r}") from e
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"safetensors shards listed in {index.name} are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {str(path)!r}")
    return files


def open_safetensors(f: Path):
    """A safetensors file's handle and tensor names; a bad header is a ModelLoadError naming the file."""
    try:
        h = safe_open(str(f), framework="pt", device="cpu")
        return h, list(h.keys())
    except Exception as e:  # safetensors raises several types for bad headers
        raise ModelLoadError(f"corrupt safetensors file {f}: {e}") from e


def _read_tensors(files: list[Path], progress: bool):
    names = []
    for f in files:
        h, keys = open_safetensors(f)
        names.extend((h, k) for k in keys)
    for h, k in tqdm(names, desc="loading weights", unit="tensor", disable=not progress, leave=False):
        try:
            yield k, h.get_tensor(k)
        except Exception as e:
            raise ModelLoadError(f"cannot read tensor {k!r}: {e}") from e


def model_class(cfg: ModelConfig) -> type[LlamaForCausalLM]:
    """The module that implements `cfg`'s architecture."""
    return MoeForCausalLM if cfg.moe is not None else LlamaForCausalLM


def load_model(path: Path, cfg: ModelConfig, max_positions: int, device: torch.device, dtype: torch.dtype,
               progress: bool = True) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = model_class(cfg)(cfg, max_positions)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    params = dict(model.named_parameters())
    pending: dict[str, list] = {}
    loaded: set[str] = set()
    expert_slices: dict[str, set[ExpertSlice]] = {}  # stacked expert weights: the slices read so far
    for name, tensor in _read_tensors(_safetensors_files(path), progress):
        target, part = map_hf_name(name, cfg)
        if target is None:
            continue
        if target not in params:
            raise ModelLoadError(f"unexpected weight {name!r} for {cfg.architecture}")
        if isinstance(part, ExpertSlice):
            if part.expert >= params[target].shape[0]:
                raise ModelLoadError(f"weight {name!r}: expert {part.expert} of {params[target].shape[0]}")
            _assign(part.view(params[target].data), tensor, name)
            done = expert_slices.setdefault(target, set())
            done.add(part)
            if len(done) == params[target].shape[0] * (1 if part.half is None else 2):
                loaded.add(target)
            continue
        if part is None:
            _assign(params[target], tensor, name)
            loaded.add(target)
            continue
        parts = gather_part(pending, target, part, tensor)
        if parts is not None:
            _assign(params[target], torch.cat(parts, dim=0), name)
            loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint at {str(path)!r} is missing weights: {missing[:8]}"
                             + (" ..." if len(missing) > 8 else ""))
    return finish_model(model, cfg, max_positions, device)


def finish_model(model: LlamaForCausalLM, cfg: ModelConfig, max_positions: int,
                 device: torch.device) -> LlamaForCausalLM:
    """The last step of every loader: non-persistent buffers are left empty by to_empty(), so the rope
    table is rebuilt; then inference mode (eval, no gradients)."""
    from tessera.ops.rope import cos_sin_cache

    model.cos_sin = cos_sin_cache(cfg.rope, cfg.head_dim, max_positions).to(device)
    return model.eval().requires_grad_(False)


def gather_part(pending: dict[str, list], target: str, part: int, value):
    """One part of a fused weight (q/k/v or gate/up, as map_hf_name names it): returns every part, in
    order, once the last one has come (and forgets them), else None."""
    parts = pending.setdefault(target, [None] * (3 if "qkv" in target else 2))
    parts[part] = value
    return None if any(p is None for p in parts) else pending.pop(target)


def map_hf_name(name: str, cfg: ModelConfig) -> tuple[str | None, int | ExpertSlice | None]:
    """Our parameter for an HF tensor name, and the part of it the tensor is: None (all of it), an int
    (a part of a fused q/k/v or gate/up weight, see gather_part) or an ExpertSlice (MoE experts)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None, None
    if name == "lm_head.weight":
        return (None, None) if cfg.tie_word_embeddings else ("lm_head.weight", None)
    if name.startswith("model.") and not name.startswith("model.layers."):
        return name[len("model."):], None
    m = _LAYER.match(name)
    if not m:
        raise ModelLoadError(f"unexpected weight {name!r} for {cfg.architecture}")
    layer, rest = m.groups()
    if cfg.moe is not None:
        rest = rest.replace("block_sparse_moe.", "mlp.", 1)  # Mixtral's name for the MoE block
        expert = _EXPERT.match(rest)
        if expert:
            stacked, half = _EXPERT_PART[expert.group(2)]
            return f"layers.{layer}.mlp.experts.{stacked}", ExpertSlice(int(expert.group(1)), half)
        if rest in _STACKED:
            return f"layers.{layer}.{_STACKED[rest]}", None
    module, _, leaf = rest.rpartition(".")
    if module in _FUSED:
        fused, part = _FUSED[module]
        return f"layers.{layer}.{fused}.{leaf}", part
    return f"layers.{layer}.{rest}", None


def _assign(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ModelLoadError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    (param.data if isinstance(param, torch.nn.Parameter) else param).copy_(tensor)
