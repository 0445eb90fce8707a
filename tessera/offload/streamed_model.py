"""Loading a model under a weight budget, and the seam that streams its layers.

`load_streamed_model` builds the model on the meta device, plans which decoder layers stay resident
(tessera.offload.plan), materializes only those (plus embeddings, LM head and norms) and fills them
from the checkpoint one tensor at a time (tessera.offload.checkpoint: pread, not mmap). The other layers
go, fused and in the compute dtype, into a layer pack (tessera.offload.layer_pack), written once and
reused while the checkpoint, dtype, quantization and plan stay the same. Quantized weights stream too
(tessera.offload.quantized_layers): `quantization="bits:N"` quantizes each layer as its tensors are read
(one layer dense in memory at a time, so a model larger than memory quantizes), and a tessera quantized
checkpoint (GGUF files kept quantized come as one) is taken as it is; either way the pack holds the
bit-plane kernel's tiles, and the budget counts the quantized bytes. In the model's layer list each streamed
layer is a `StreamedLayer`: a module without parameters whose forward borrows a buffer-backed layer
from the streamer for the duration of the call: on CPUs a LayerStreamer (a reader thread from disk), on a
CUDA GPU a DeviceLayerStreamer (pinned host memory, a ring of device buffers, a copy stream; dense weights
only for now, and unmeasured). Nothing else in tessera knows about streaming.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn
from tqdm.auto import tqdm

from tessera.config import ModelConfig
from tessera.errors import InvalidRequestError, ModelLoadError
from tessera.heap import trim_heap
from tessera.models.llama import DecoderLayer, LlamaForCausalLM
from tessera.models.loader import _safetensors_files, finish_model, map_hf_name
from tessera.offload.checkpoint import iter_tensors
from tessera.offload.device_streamer import DEVICE_NUM_BUFFERS, DeviceLayerStreamer
from tessera.offload.layer_pack import LayerLayout, PackWriter, pack_key, pack_path, read_header
from tessera.offload.plan import NUM_BUFFERS, WeightPlan, plan_weights
from tessera.offload.quantized_layers import (
    LinearTable,
    bind_quantized,
    fill_quantized,
    quantizable_linears,
    quantized_bytes,
    quantized_layout,
)
from tessera.offload.streamer import LayerStreamer, aligned_buffer
from tessera.ops.linear import DENSE, LinearMethod
from tessera.quant.bits_linear import BitsLinearMethod
from tessera.quant.checkpoint import CheckpointLayout
from tessera.quant.quantize import QuantizedWeight, QuantSpec, quantize_weight

log = logging.getLogger(__name__)

_TARGET = re.compile(r"^layers\.(\d+)\.(.+)$")
_CHECKPOINT_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")  # HF names, or a quantized checkpoint's


class StreamedLayer(nn.Module):
    """Stands in for decoder layer `layer_idx`, whose weights live in the layer pack."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.streamer: LayerStreamer | DeviceLayerStreamer | None = None  # set once the pack exists

    def forward(self, x, residual, cos_sin, kv_cache, meta):
        with self.streamer.layer(self.layer_idx) as layer:
            layer.self_attn.layer_idx = self.layer_idx  # sparse KV retrieval reads it
            return layer(x, residual, cos_sin, kv_cache, meta)

    def extra_repr(self) -> str:
        return f"layer {self.layer_idx}, streamed from {self.streamer.path if self.streamer else '(no pack yet)'}"


def offload_dir() -> Path:
    """Where layer packs go: $TESSERA_OFFLOAD_DIR, else <tessera cache>/offload."""
    env = os.environ.get("TESSERA_OFFLOAD_DIR")
    if env:
        return Path(env).expanduser()
    from tessera.models.default_model import cache_dir

    return cache_dir() / "offload"


def _rows(suffix: str, part: int | None, cfg: ModelConfig) -> slice:
    """The rows of a fused parameter that checkpoint part `part` fills (q/k/v, gate/up)."""
    if part is None:
        return slice(None)
    if "qkv_proj" in suffix:
        q, kv = cfg.q_size, cfg.kv_size
        return [slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)][part]
    inter = cfg.intermediate_size
    return [slice(0, inter), slice(inter, 2 * inter)][part]


def _pieces(suffix: str) -> int:
    return 3 if "qkv_proj" in suffix else 2 if "gate_up_proj" in suffix else 1


def _copy(dest: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if tuple(dest.shape) != tuple(tensor.shape):
        raise ModelLoadError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
    dest.copy_(tensor)


def layer_maker(cfg: ModelConfig, dtype: torch.dtype, method: LinearMethod | None = None):
    """make_layer for the streamer: a DecoderLayer whose tensors are the given buffer views (dense parameters
    as Parameters; quantized linears as the bit-plane kernel's tiles, multiplied by `method`)."""
    def make(layout: LayerLayout, views: dict[str, torch.Tensor]) -> nn.Module:
        with torch.device("meta"):
            layer = DecoderLayer(cfg)
        for name, t in views.items():
            if ".qtiles." not in name:
                path, _, leaf = name.rpartition(".")
                setattr(layer.get_submodule(path), leaf, nn.Parameter(t, requires_grad=False))
        if method is not None:
            bind_quantized(layer, layout, views, method, dtype)
        return layer.eval()

    return make


@dataclass
class WeightSource:
    """What the layers are made of: dense checkpoint weights (`quant` None), the same quantized at load
    (`quant` a bits:N QuantSpec), or a tessera quantized checkpoint (`checkpoint`, its planes as they are)."""

    quant: QuantSpec | None = None
    checkpoint: CheckpointLayout | None = None

    @property
    def spec(self) -> QuantSpec | None:
        return self.checkpoint.spec() if self.checkpoint is not None else self.quant

    def linears(self, layer_idx: int, template: nn.Module) -> LinearTable:
        """The quantized linears of decoder layer `layer_idx`: suffix -> (bits, group size)."""
        if self.checkpoint is not None:
            prefix = f"layers.{layer_idx}."
            return {name[len(prefix):]: (e.bits, e.group_size) for name, e in self.checkpoint.linears.items()
                    if name.startswith(prefix)}
        if self.quant is not None:
            return dict.fromkeys(quantizable_linears(template), (self.quant.bits, self.quant.group_size))
        return {}

    def describe(self) -> str | None:
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint.quantization} ({self.checkpoint.method})"
        if self.quant is not None:
            return f"bits:{self.quant.bits} group {self.quant.group_size} {self.quant.method}"
        return None


def layer_layouts(cfg: ModelConfig, dtype: torch.dtype, source: WeightSource) -> list[LayerLayout]:
    """Each decoder layer's region layout (layers with equal layouts share one object)."""
    with torch.device("meta"):
        template = DecoderLayer(cfg).to(dtype)
    distinct: dict[str, LayerLayout] = {}
    out = []
    for i in range(cfg.num_layers):
        layout = quantized_layout(template, dtype, source.linears(i, template))
        out.append(distinct.setdefault(json.dumps(layout.to_json()), layout))
    return out


def _always_bytes(model: nn.Module, cfg: ModelConfig, source: WeightSource) -> int:
    """Embeddings, final norm, LM head: resident whatever the budget; a quantized checkpoint's LM head in
    its quantized form (beside the embeddings it ties to, or instead of its own dense matrix)."""
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("layers."))
    head = source.checkpoint.linears.get("lm_head") if source.checkpoint is not None else None
    if head is None:
        return dense
    if not cfg.tie_word_embeddings:
        w = model.lm_head.weight
        dense -= w.numel() * w.element_size()
    return dense + quantized_bytes(head.n, head.k, head.bits, head.group_size)


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype, source: WeightSource) -> int:
    """The model's weight bytes as tessera holds them resident (quantized linears in the kernel's layout)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, 1).to(dtype)
    return _always_bytes(model, cfg, source) + sum(lay.nbytes for lay in layer_layouts(cfg, dtype, source))


def load_streamed_model(path: Path, cfg: ModelConfig, max_positions: int, device: torch.device,
                        dtype: torch.dtype, budget: int | None, progress: bool = True,
                        source: WeightSource | None = None) -> LlamaForCausalLM:
    """`budget` None: no budget, every layer resident; what this loader still gives then is quantizing at
    load tensor by tensor (`source.quant`), never holding the dense model (the engine's resident
    `quantization="bits:N"` path)."""
    source = source or WeightSource()
    if device.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"weight_memory (weight streaming) runs on CPUs and CUDA GPUs, not {device.type}")
    if device.type == "cuda" and source.spec is not None:
        raise InvalidRequestError("weight_memory with quantized weights runs on CPUs only for now: the layer pack "
                                  "holds the CPU kernel's tiles, and streaming the GPU kernels' layout is not built "
                                  "yet (dense weights stream on a GPU)")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions)
    model = model.to(dtype)  # on meta: free; the real tensors are then made in the compute dtype directly
    layouts = layer_layouts(cfg, dtype, source)
    always = _always_bytes(model, cfg, source)
    whole = always + sum(lay.nbytes for lay in layouts)
    plan = plan_weights(whole if budget is None else budget, always, max(lay.nbytes for lay in layouts),
                        max(lay.region_bytes for lay in layouts), cfg.num_layers,
                        DEVICE_NUM_BUFFERS if device.type == "cuda" else NUM_BUFFERS)
    if budget is None:
        log.info("quantizing at load (%s), layer by layer as the checkpoint is read: %.0f MiB of weights resident",
                 source.describe(), whole / 2**20)
    else:
        log.info("%s%s", plan.describe(), f" ({source.describe()})" if source.describe() else "")
    with torch.device("meta"):
        template = DecoderLayer(cfg).to(dtype)  # every decoder layer's names and shapes
    tables = {i: source.linears(i, template) for i in range(cfg.num_layers)}
    for i in plan.streamed:
        model.layers[i] = StreamedLayer(i)
    # A quantized linear keeps no dense weight: its planes come as `loaded_qweight` (BitsLinearMethod's seam).
    quantized = [f"layers.{i}.{m}" for i in range(cfg.num_layers) if i not in plan.streamed for m in tables[i]]
    if source.checkpoint is not None and "lm_head" in source.checkpoint.linears and not cfg.tie_word_embeddings:
        quantized.append("lm_head")
    for name in quantized:
        model.get_submodule(name).weight = nn.Parameter(torch.empty(0, device="meta", dtype=dtype),
                                                        requires_grad=False)
    model = model.to_empty(device=device)  # the resident parameters only
    model.tie_weights()
    files = _safetensors_files(path)
    pack, writer, lock = None, None, None
    if plan.streamed:
        key = pack_key(files, dtype, list(plan.streamed), [layouts[i] for i in plan.streamed], source.describe())
        pack = pack_path(offload_dir(), key)
        pack.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(pack) + ".lock")
        lock.acquire()  # two engines on one checkpoint: one writes the pack, the other waits and reuses it
        try:
            header = read_header(pack)
            if header is not None and header["key"] == key:
                log.info("reusing the layer pack %s", pack)
            else:
                writer = PackWriter(pack, key)
                log.info("writing %d streamed layers (%.2f GiB) to the layer pack %s", len(plan.streamed),
                         plan.streamed_bytes_per_step / 2**30, pack)
        finally:
            if writer is None:
                lock.release()
                lock = None
    try:
        _Filler(model, cfg, dtype, path, layouts, tables, template, plan, source, writer).run(files, progress)
        if writer is not None:
            writer.finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if lock is not None:
            lock.release()
    model = finish_model(model, cfg, max_positions, device)
    trim_heap()
    model.weight_plan = plan
    model.weight_streamer = None
    if plan.streamed:
        spec = source.spec
        method = None if spec is None else BitsLinearMethod(spec, DENSE)
        streamed_layouts, make = [layouts[i] for i in plan.streamed], layer_maker(cfg, dtype, method)
        if device.type == "cuda":  # pinned host memory, a ring of device buffers, a copy stream
            streamer = DeviceLayerStreamer(pack, streamed_layouts, list(plan.streamed), make, plan.num_buffers,
                                           device)
        else:  # a reader thread from disk into host buffers
            streamer = LayerStreamer(pack, streamed_layouts, list(plan.streamed), make, plan.num_buffers)
        for layer in model.layers:
            if isinstance(layer, StreamedLayer):
                layer.streamer = streamer
        model.weight_streamer = streamer
    return model


class _Filler:
    """Puts every checkpoint tensor where it belongs, reading the checkpoint once, in file order: a resident
    parameter, a resident quantized linear's `loaded_qweight`, or a streamed layer's staging buffer, which
    goes to the pack as soon as the layer is whole (checkpoints keep a layer's tensors together, so one
    staging buffer is in use at a time). A linear quantized at load is quantized as its checkpoint tensors
    come in (round to nearest: each q/k/v or gate/up part alone, which gives the fused weight's codes; HQQ,
    whose stopping rule looks at the whole matrix: the fused weight), so at most one layer's weights are
    ever dense in memory."""

    def __init__(self, model: LlamaForCausalLM, cfg: ModelConfig, dtype: torch.dtype, path: Path,
                 layouts: list[LayerLayout], tables: dict[int, LinearTable], template: nn.Module, plan: WeightPlan,
                 source: WeightSource, writer: PackWriter | None):
        self.model, self.cfg, self.dtype, self.path = model, cfg, dtype, path
        self.layouts, self.tables, self.template, self.source, self.writer = layouts, tables, template, source, writer
        self.params = {n: p for n, p in model.named_parameters() if p.numel()}
        self.modules = dict(model.named_modules())
        self.position = {layer: k for k, layer in enumerate(plan.streamed)}
        # Units of each layer (None: outside the layers): a dense tensor counts its checkpoint pieces, a
        # quantized linear one (its whole QuantizedWeight).
        self.expected: dict[int | None, dict[str, int]] = {}
        pieces = (lambda suffix: 1) if source.checkpoint is not None else _pieces
        for i in range(cfg.num_layers):
            if i in self.position and writer is None:
                continue  # a reused pack: the streamed layers are not read
            table = tables[i]
            want = {f"{m}.qweight": 1 for m in table}
            for name, _ in template.named_parameters():
                if not (name.endswith(".weight") and name.rpartition(".")[0] in table):
                    want[name] = pieces(name)
            self.expected[i] = want
        self.expected[None] = {n: pieces(n) for n in self.params if not n.startswith("layers.")}
        if source.checkpoint is not None and "lm_head" in source.checkpoint.linears:
            self.expected[None]["lm_head.qweight"] = 1
        self.done: dict[int | None, dict[str, int]] = {k: {} for k in self.expected}
        self.staging: dict[int, dict[str, torch.Tensor]] = {}
        self.buffers: dict[int, torch.Tensor] = {}
        self.spare: list[torch.Tensor] = []
        self.parts: dict[str, dict] = {}  # pieces of a linear not yet whole: quantized parts, dense parts (HQQ)

    def run(self, files: list[Path], progress: bool) -> None:
        def want(name: str) -> bool:  # with a reused pack, the streamed layers' tensors are never read
            m = _CHECKPOINT_LAYER.match(name)
            return self.writer is not None or m is None or int(m.group(1)) not in self.position

        self.bar = tqdm(total=len(self.position) if self.writer else 0, desc="writing layer pack", unit="layer",
                        disable=not (progress and self.writer), leave=False)
        for name, tensor in iter_tensors(files, want):
            self._take(name, tensor)
        self.bar.close()
        missing = [f"{'' if layer is None else f'layers.{layer}.'}{key}" for layer, want in self.expected.items()
                   for key, n in want.items() if self.done[layer].get(key, 0) != n]
        if missing:
            raise ModelLoadError(f"checkpoint is missing weights: {sorted(missing)[:8]}"
                                 + (" ..." if len(missing) > 8 else ""))

    def _take(self, name: str, tensor: torch.Tensor) -> None:
        if self.source.checkpoint is not None:
            module, sep, part = name.rpartition(".qweight.")
            if sep:
                self._quantized_part(name, module, part, tensor)
                return
            target, part = name, None
        else:
            target, part = map_hf_name(name, self.cfg)
            if target is None:
                return
        layer, key = _split(target)
        module = key.rpartition(".")[0]
        if self.source.quant is not None and layer is not None and key.endswith(".weight") \
                and module in self.tables[layer]:
            self._quantize(name, target, part, tensor)
            return
        dest = self._dest(layer, key, name)
        _copy(dest[_rows(key, part, self.cfg)], tensor, name)
        self._count(layer, key)

    def _dest(self, layer: int | None, key: str, name: str) -> torch.Tensor:
        if layer in self.position:
            views = self._views(layer)
            if key not in views:
                raise ModelLoadError(f"unexpected weight {name!r} for {self.cfg.architecture}")
            return views[key]
        target = key if layer is None else f"layers.{layer}.{key}"
        if target not in self.params:
            raise ModelLoadError(f"unexpected weight {name!r} for {self.cfg.architecture}")
        return self.params[target].data

    def _quantized_part(self, name: str, module: str, part: str, tensor: torch.Tensor) -> None:
        """One of planes / scale / offset of a tessera quantized checkpoint's linear."""
        from tessera.quant.checkpoint import PARTS, _quantized_weight

        entry = self.source.checkpoint.linears.get(module)
        if entry is None or part not in PARTS:
            raise ModelLoadError(f"{self.path}: unexpected tensor {name!r} for {self.cfg.architecture}")
        got = self.parts.setdefault(module, {})
        got[part] = tensor
        if len(got) < len(PARTS):
            return
        del self.parts[module]
        layer, key = _split(module)
        shell = self.modules.get(module) if layer not in self.position else self.template.get_submodule(key)
        self._place(layer, key, _quantized_weight(module, entry, got, shell, self.path))

    def _quantize(self, name: str, target: str, part: int | None, tensor: torch.Tensor) -> None:
        """A dense checkpoint tensor of a linear quantized at load (bits:N)."""
        spec = self.source.quant
        # Cast first: the resident engine quantizes the weight in the compute dtype.
        value = tensor.to(self.dtype)
        if part is None:
            qw = quantize_weight(value, spec)
        else:
            got = self.parts.setdefault(target, {})
            got[part] = quantize_weight(value, spec) if spec.method == "rtn" else value
            if len(got) < (3 if "qkv" in target else 2):
                return
            del self.parts[target]
            ordered = [got[i] for i in sorted(got)]
            qw = (QuantizedWeight.cat_rows(ordered) if spec.method == "rtn"
                  else quantize_weight(torch.cat(ordered), spec))
        layer, key = _split(target)
        module = key.rpartition(".")[0]
        lin = self.template.get_submodule(module)
        if (qw.n, qw.k) != (lin.out_features, lin.in_features):
            raise ModelLoadError(f"weight {name!r}: the weight is [{qw.n}, {qw.k}], expected "
                                 f"[{lin.out_features}, {lin.in_features}]")
        self._place(layer, module, qw)

    def _place(self, layer: int | None, module: str, qw: QuantizedWeight) -> None:
        """A whole quantized linear: into the staging buffer's tiles, or onto the resident linear."""
        if layer in self.position:
            try:
                fill_quantized(self._views(layer), module, qw)
            except (KeyError, ValueError) as e:
                raise ModelLoadError(f"{self.path}: layer {layer}: {e}") from e
        else:
            self.modules[module if layer is None else f"layers.{layer}.{module}"].loaded_qweight = qw
        self._count(layer, f"{module}.qweight")

    def _views(self, layer: int) -> dict[str, torch.Tensor]:
        if layer not in self.staging:
            buf = self.spare.pop() if self.spare else aligned_buffer(max(lay.region_bytes for lay in self.layouts))
            buf.zero_()  # the padding between tensors is written too; keep it deterministic
            self.buffers[layer] = buf
            self.staging[layer] = self.layouts[layer].views(buf)
        return self.staging[layer]

    def _count(self, layer: int | None, key: str) -> None:
        done = self.done.setdefault(layer, {})
        done[key] = done.get(key, 0) + 1
        if layer is None or done != self.expected[layer]:
            return
        if layer in self.position:
            buf = self.buffers.pop(layer)
            self.writer.write(self.position[layer], buf)
            del self.staging[layer]
            self.spare.append(buf)
            self.bar.update(1)
        trim_heap()  # the layer is whole: its read, quantized and tiled transients go back to the OS


def _split(target: str) -> tuple[int | None, str]:
    """'layers.3.mlp.down_proj.weight' -> (3, 'mlp.down_proj.weight'); 'norm.weight' -> (None, 'norm.weight')."""
    m = _TARGET.match(target)
    return (int(m.group(1)), m.group(2)) if m else (None, target)
