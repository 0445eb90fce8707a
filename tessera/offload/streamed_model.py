"""Loading a model under a weight budget, and the seam that streams its layers.

`load_streamed_model` builds the model on the meta device, plans which decoder layers stay resident
(tessera.offload.plan), materializes only those (plus embeddings, LM head and norms) and fills them
from the checkpoint one tensor at a time (tessera.offload.checkpoint: pread, not mmap). The other layers
go, fused and in the compute dtype, into a layer pack (tessera.offload.layer_pack), written once and
reused while the checkpoint, dtype and plan stay the same. In the model's layer list each streamed
layer is a `StreamedLayer`: a module without parameters whose forward borrows a buffer-backed layer
from the LayerStreamer for the duration of the call. Nothing else in tessera knows about streaming.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn
from tqdm.auto import tqdm

from tessera.config import ModelConfig
from tessera.errors import InvalidRequestError, ModelLoadError
from tessera.models.llama import DecoderLayer, LlamaForCausalLM
from tessera.models.loader import _safetensors_files, finish_model, map_hf_name
from tessera.offload.checkpoint import iter_tensors
from tessera.offload.layer_pack import LayerLayout, PackWriter, pack_key, pack_path, read_header
from tessera.offload.plan import WeightPlan, plan_weights
from tessera.offload.streamer import LayerStreamer, aligned_buffer

log = logging.getLogger(__name__)

_TARGET = re.compile(r"^layers\.(\d+)\.(.+)$")
_CHECKPOINT_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class StreamedLayer(nn.Module):
    """Stands in for decoder layer `layer_idx`, whose weights live in the layer pack."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.streamer: LayerStreamer | None = None  # set once the pack exists

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


def _bind(layer: nn.Module, views: dict[str, torch.Tensor]) -> nn.Module:
    for name, t in views.items():
        path, _, leaf = name.rpartition(".")
        setattr(layer.get_submodule(path), leaf, nn.Parameter(t, requires_grad=False))
    return layer.eval()


def layer_maker(cfg: ModelConfig):
    """make_layer for the streamer: a DecoderLayer whose parameters are the given buffer views."""
    def make(views: dict[str, torch.Tensor]) -> nn.Module:
        with torch.device("meta"):
            layer = DecoderLayer(cfg)
        return _bind(layer, views)

    return make


def load_streamed_model(path: Path, cfg: ModelConfig, max_positions: int, device: torch.device,
                        dtype: torch.dtype, budget: int, progress: bool = True) -> LlamaForCausalLM:
    if device.type != "cpu":
        raise InvalidRequestError("weight_memory (weight streaming) runs on CPUs for now; on a GPU the streamed "
                                  "layers would come from pinned host memory, which is not built yet")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions)
    model = model.to(dtype)  # on meta: free; the real tensors are then made in the compute dtype directly
    layout = LayerLayout.of(model.layers[0], dtype)
    elt = torch.empty((), dtype=dtype).element_size()
    always = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("layers.")) * elt
    plan = plan_weights(budget, always, sum(s.nbytes for s in layout.slots), layout.region_bytes, cfg.num_layers)
    log.info("%s", plan.describe())
    streamed = set(plan.streamed)
    for i in plan.streamed:
        model.layers[i] = StreamedLayer(i)
    model = model.to_empty(device=device)  # the resident parameters only
    model.tie_weights()
    files = _safetensors_files(path)
    pack, writer, lock = None, None, None
    if plan.streamed:
        key = pack_key(files, dtype, list(plan.streamed), layout)
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
        _fill(model, cfg, files, layout, plan, writer, progress)
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
    model.weight_plan = plan
    model.weight_streamer = None
    if plan.streamed:
        streamer = LayerStreamer(pack, layout, sorted(streamed), layer_maker(cfg), plan.num_buffers)
        for layer in model.layers:
            if isinstance(layer, StreamedLayer):
                layer.streamer = streamer
        model.weight_streamer = streamer
    return model


def _fill(model: LlamaForCausalLM, cfg: ModelConfig, files: list[Path], layout: LayerLayout, plan: WeightPlan,
          writer: PackWriter | None, progress: bool) -> None:
    """Copies every checkpoint tensor into its resident parameter or its streamed layer's staging buffer;
    a streamed layer goes to the pack as soon as all its pieces are in (checkpoints keep a layer's tensors
    together, so one staging buffer is in use at a time)."""
    params = dict(model.named_parameters())
    position = {layer: k for k, layer in enumerate(plan.streamed)}
    pieces = {s.name: _pieces(s.name) for s in layout.slots}
    per_layer = sum(pieces.values())
    done: dict[str, int] = {}
    staging: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
    spare: list[torch.Tensor] = []
    written = 0

    def want(name: str) -> bool:  # with a reused pack, the streamed layers' tensors are never read
        m = _CHECKPOINT_LAYER.match(name)
        return writer is not None or m is None or int(m.group(1)) not in position

    bar = tqdm(total=len(plan.streamed) if writer else 0, desc="writing layer pack", unit="layer",
               disable=not (progress and writer), leave=False)
    for name, tensor in iter_tensors(files, want):
        target, part = map_hf_name(name, cfg)
        if target is None:
            continue
        m = _TARGET.match(target)
        layer = int(m.group(1)) if m else None
        if layer is not None and layer in position:
            if layer not in staging:
                buf = spare.pop() if spare else aligned_buffer(layout.region_bytes)
                buf.zero_()  # the padding between tensors is written too; keep it deterministic
                staging[layer] = (buf, layout.views(buf))
            buf, views = staging[layer]
            suffix = m.group(2)
            if suffix not in views:
                raise ModelLoadError(f"unexpected weight {name!r} for {cfg.architecture}")
            _copy(views[suffix][_rows(suffix, part, cfg)], tensor, name)
            done[target] = done.get(target, 0) + 1
            if sum(done.get(f"layers.{layer}.{s}", 0) for s in pieces) == per_layer:
                writer.write(position[layer], buf)
                spare.append(staging.pop(layer)[0])
                written += 1
                bar.update(1)
            continue
        if target not in params:
            raise ModelLoadError(f"unexpected weight {name!r} for {cfg.architecture}")
        _copy(params[target].data[_rows(target, part, cfg)], tensor, name)
        done[target] = done.get(target, 0) + 1
    bar.close()
    missing = sorted(t for t in params if done.get(t, 0) != _pieces(t))
    if writer is not None:
        missing += sorted(f"layers.{layer}.{s}" for layer in plan.streamed for s in pieces
                          if done.get(f"layers.{layer}.{s}", 0) != pieces[s])
    if missing:
        raise ModelLoadError(f"checkpoint is missing weights: {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
