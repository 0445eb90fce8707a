"""Read and check a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) against the
base model it is to run on.

What tessera runs is plain LoRA on the decoder's linear layers: y = W x + s * B (A x), with
s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). Anything that changes that product or adds
weights outside those layers (DoRA's magnitudes, modules_to_save, LoRA biases, embedding or LM-head
targets, aLoRA, ...) is refused with the field that asks for it, never silently ignored: the output
would differ from the adapter's. The scale is folded into B once here, in fp32.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tessera.config import ModelConfig
from tessera.errors import AdapterNotFoundError, ModelLoadError, UnsupportedModelError

# The HF module names tessera applies LoRA to, and the PEFT shorthand for all of them.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])"
                  r"(?:\.[\w-]+)?\.weight$")
# Config fields that change what the adapter computes; any truthy value is refused.
_UNSUPPORTED = ("use_dora", "modules_to_save", "lora_bias", "fan_in_fan_out", "alpha_pattern",
                "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora",
                "alora_invocation_tokens", "use_bdlora", "arrow_config")


def module_shape(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(in_features, out_features) of an HF target module of the base model."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}[target]


@dataclass
class LoRAAdapter:
    """An adapter in host memory: per (layer, HF target) the pair (A [r, in], s * B [out, r]), fp32."""

    name: str
    path: str
    rank: int  # the largest rank of any of its modules
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def load_adapter(name: str, path: str | Path, cfg: ModelConfig, max_rank: int) -> LoRAAdapter:
    """Load and check the adapter at `path` for a base model of config `cfg`; raises AdapterNotFoundError
    (its directory or a file missing), ModelLoadError (corrupt files, shapes that do not fit the base
    model) or UnsupportedModelError (a feature tessera does not run, a rank above max_rank)."""
    d = Path(path).expanduser()
    where = f"LoRA adapter {name!r} at {str(path)!r}"
    if not d.is_dir():
        raise AdapterNotFoundError(f"{where}: no such directory")
    try:
        conf = json.loads((d / "adapter_config.json").read_text())
    except FileNotFoundError as e:
        raise AdapterNotFoundError(f"{where}: no adapter_config.json") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{where}: cannot read adapter_config.json: {e}") from e
    _check_config(conf, where)
    tensors = _read_tensors(d, where)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise UnsupportedModelError(f"{where}: weight {key!r} is not a LoRA A/B of a decoder linear layer; "
                                        f"tessera applies LoRA to {', '.join(TARGETS)} only")
        layer, target, ab = int(m.group(1)), m.group(2), m.group(3)
        if target not in TARGETS:
            raise UnsupportedModelError(f"{where}: target module {target!r} is not supported "
                                        f"(tessera applies LoRA to {', '.join(TARGETS)})")
        if layer >= cfg.num_layers:
            raise ModelLoadError(f"{where}: weight {key!r} is for layer {layer}, but the base model has "
                                 f"{cfg.num_layers} layers (an adapter for another base model?)")
        pairs.setdefault((layer, target), {})[ab] = t
    if not pairs:
        raise ModelLoadError(f"{where}: adapter_model.safetensors holds no LoRA weights")
    alpha, rslora = float(conf.get("lora_alpha", 8)), bool(conf.get("use_rslora", False))
    weights, rank = {}, 0
    for (layer, target), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ModelLoadError(f"{where}: layer {layer} {target} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"].float(), ab["B"].float()
        fan_in, fan_out = module_shape(cfg, target)
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
            raise ModelLoadError(f"{where}: layer {layer} {target}: lora_A {tuple(a.shape)} and lora_B "
                                 f"{tuple(b.shape)} are not a rank-r pair")
        if a.shape[1] != fan_in or b.shape[0] != fan_out:
            raise ModelLoadError(
                f"{where}: layer {layer} {target} maps {a.shape[1]} -> {b.shape[0]} features but the base model's "
                f"{target} maps {fan_in} -> {fan_out} (hidden size {cfg.hidden_size}): the adapter was trained "
                f"for another base model")
        if r > max_rank:
            raise UnsupportedModelError(f"{where}: rank {r} (layer {layer} {target}) exceeds max_lora_rank "
                                        f"{max_rank}; raise max_lora_rank")
        scale = alpha / (math.sqrt(r) if rslora else r)
        weights[(layer, target)] = (a.contiguous(), (b * scale).contiguous())
        rank = max(rank, r)
    return LoRAAdapter(name, str(path), rank, weights)


def _check_config(conf: dict, where: str) -> None:
    peft_type = str(conf.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedModelError(f"{where}: peft_type {peft_type!r} is not supported (LoRA only)")
    for f in _UNSUPPORTED:
        if conf.get(f):
            raise UnsupportedModelError(f"{where}: {f}={conf[f]!r} is not supported by tessera's LoRA")
    if conf.get("bias", "none") != "none":
        raise UnsupportedModelError(f"{where}: bias={conf['bias']!r} is not supported (LoRA without biases only)")
    targets = conf.get("target_modules")
    if isinstance(targets, list | tuple):
        bad = [t for t in targets if str(t).rsplit(".", 1)[-1] not in TARGETS]
        if bad:
            raise UnsupportedModelError(f"{where}: target modules {bad} are not supported "
                                        f"(tessera applies LoRA to {', '.join(TARGETS)})")
    # A string is a regex (or "all-linear"); the weights in the file say what it matched, checked there.


def _read_tensors(d: Path, where: str) -> dict[str, torch.Tensor]:
    st, binf = d / "adapter_model.safetensors", d / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if binf.is_file():
            return torch.load(str(binf), map_location="cpu", weights_only=True)
    except FileNotFoundError as e:  # removed since is_file() looked
        raise AdapterNotFoundError(f"{where}: its weights file vanished while being read ({e})") from e
    except Exception as e:  # safetensors and torch.load raise several types for corrupt files
        raise ModelLoadError(f"{where}: cannot read its weights: {e}") from e
    raise AdapterNotFoundError(f"{where}: no adapter_model.safetensors (or adapter_model.bin)")
