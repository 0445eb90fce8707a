"""tessera's quantized checkpoint: bit planes saved once, loaded without quantizing again.

A directory like a Hugging Face one (config.json, tokenizer files, safetensors shards with an index)
plus `bitplanes.json`, which says how it was quantized and lists every quantized linear:

    {"format": "tessera-bitplanes", "version": 1, "quantization": "bits:4" | "gguf", "method": "rtn",
     "group_size": 64, "lm_head": false, "source": "...", "source_size": 123,
     "linears": {"layers.0.self_attn.qkv_proj": {"bits": 4, "group_size": 64, "k": 576, "n": 960}, ...}}

Tensor names are tessera's (fused q/k/v and gate/up, as tessera.models.loader builds them). A quantized
linear `X` is stored as `X.qweight.planes` (uint8 [bits, n, K_pad / 8], the canonical bit planes of
tessera.quant.bitplanes), `X.qweight.scale` and `X.qweight.offset` (fp32 [n, K_pad / group]); the
kernel's tile layout is made from them at load. Everything else (embeddings, norms, biases, a dense LM
head) is stored as is. `tessera quantize` writes one (tessera.quant.convert); `LLM(model=dir)` loads it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tessera.config import ModelConfig
from tessera.errors import ModelLoadError
from tessera.models.llama import LlamaForCausalLM
from tessera.models.loader import _assign, _read_tensors, _safetensors_files, finish_model
from tessera.ops.linear import Linear
from tessera.quant.quantize import QuantizedWeight, QuantSpec

LAYOUT_FILE = "bitplanes.json"
FORMAT, VERSION = "tessera-bitplanes", 1
PARTS = ("planes", "scale", "offset")


@dataclass(frozen=True)
class LinearLayout:
    bits: int
    group_size: int
    k: int
    n: int


@dataclass
class CheckpointLayout:
    quantization: str  # "bits:N" or "gguf"
    method: str  # rtn | hqq | gguf
    group_size: int
    lm_head: bool
    source: str = ""
    source_size: int = 0
    linears: dict[str, LinearLayout] = field(default_factory=dict)

    def spec(self) -> QuantSpec:
        if self.quantization == "gguf":
            return QuantSpec.parse("gguf")
        return QuantSpec(int(self.quantization.split(":")[1]), self.group_size, self.method)

    def write(self, out_dir: Path) -> None:
        doc = {"format": FORMAT, "version": VERSION, **asdict(self)}
        (out_dir / LAYOUT_FILE).write_text(json.dumps(doc, indent=1) + "\n")


def read_layout(path: str | Path) -> CheckpointLayout | None:
    """The layout of the quantized checkpoint at `path`, or None when it is not one."""
    f = Path(path) / LAYOUT_FILE
    if not f.is_file():
        return None
    try:
        doc = json.loads(f.read_text())
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise ValueError(f"format {doc.get('format')!r} version {doc.get('version')!r}, "
                             f"this tessera reads {FORMAT!r} version {VERSION}")
        linears = {name: LinearLayout(**entry) for name, entry in doc["linears"].items()}
        layout = CheckpointLayout(doc["quantization"], doc["method"], int(doc["group_size"]), bool(doc["lm_head"]),
                                  doc.get("source", ""), int(doc.get("source_size", 0)), linears)
        layout.spec()
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelLoadError(f"{f}: not a valid tessera quantized-checkpoint layout ({e})") from e
    return layout


def quantized_linear_names(cfg: ModelConfig, lm_head: bool) -> list[str]:
    """The linears a quantizing method quantizes (those with `quantize` set; the LM head if asked)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, 1)
    return [n for n, m in model.named_modules() if isinstance(m, Linear) and (m.quantize or (lm_head and
                                                                                              n == "lm_head"))]


def load_quantized_model(path: Path, cfg: ModelConfig, max_positions: int, device: torch.device,
                         dtype: torch.dtype, progress: bool = True) -> LlamaForCausalLM:
    """Build the model from a quantized checkpoint: dense tensors into their parameters, the bit planes
    attached to their linears as `loaded_qweight` (BitsLinearMethod takes them as they are)."""
    layout = read_layout(path)
    if layout is None:
        raise ModelLoadError(f"{path} is not a tessera quantized checkpoint (no {LAYOUT_FILE})")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions)
    modules = dict(model.named_modules())
    for name in layout.linears:
        if not isinstance(modules.get(name), Linear):
            raise ModelLoadError(f"{path}: quantized weight {name!r} is not a linear of {cfg.architecture}")
        if name != "lm_head" or not cfg.tie_word_embeddings:  # a tied head reads the (dense) embeddings
            modules[name].weight = torch.nn.Parameter(torch.empty(0, device="meta"), requires_grad=False)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    params = {n: p for n, p in model.named_parameters() if p.numel()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    loaded: set[str] = set()
    for key, tensor in _read_tensors(_safetensors_files(path), progress):
        module, sep, part = key.rpartition(".qweight.")
        if sep and module in layout.linears and part in PARTS:
            parts.setdefault(module, {})[part] = tensor
        elif key in params:
            _assign(params[key], tensor, key)
            loaded.add(key)
        else:
            raise ModelLoadError(f"{path}: unexpected tensor {key!r} for {cfg.architecture}")
    missing = sorted(set(params) - loaded) + sorted(set(layout.linears) - {n for n, p in parts.items()
                                                                           if len(p) == len(PARTS)})
    if missing:
        raise ModelLoadError(f"quantized checkpoint at {str(path)!r} is missing weights: {missing[:8]}"
                             + (" ..." if len(missing) > 8 else ""))
    for name, entry in layout.linears.items():  # to_empty() kept the module objects
        modules[name].loaded_qweight = _quantized_weight(name, entry, parts.pop(name), modules[name], path)
    return finish_model(model, cfg, max_positions, device)


def _quantized_weight(name: str, entry: LinearLayout, p: dict[str, torch.Tensor], layer: Linear,
                      path: Path) -> QuantizedWeight:
    from tessera.quant.bitplanes import padded_k

    groups = padded_k(entry.k) // entry.group_size
    want = {"planes": (entry.bits, entry.n, padded_k(entry.k) // 8), "scale": (entry.n, groups),
            "offset": (entry.n, groups)}
    for part, shape in want.items():
        if tuple(p[part].shape) != shape:
            raise ModelLoadError(f"{path}: {name}.qweight.{part} has shape {tuple(p[part].shape)}, expected {shape}")
    if (entry.n, entry.k) != (layer.out_features, layer.in_features):
        raise ModelLoadError(f"{path}: {name} is [{entry.n}, {entry.k}], the model needs "
                             f"[{layer.out_features}, {layer.in_features}]")
    return QuantizedWeight(p["planes"].to(torch.uint8), p["scale"].float().contiguous(),
                           p["offset"].float().contiguous(), entry.bits, entry.group_size, entry.k)
