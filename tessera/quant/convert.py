"""Write a tessera quantized checkpoint (tessera.quant.checkpoint), one decoder layer at a time.

Sources: a Hugging Face safetensors directory or a GGUF file. `bits:N` quantizes the dense weights
(a GGUF's are dequantized a tensor at a time first); `gguf` keeps a GGUF's own blocks
(tessera.quant.gguf_planes), so no float copy of a quantized weight is ever made. Either way the
converter holds one layer's tensors and one output shard at a time (tessera.models.shard_writer):
a model larger than memory converts. `tessera quantize` is the command.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tessera.config import ModelConfig
from tessera.errors import ModelLoadError, UnsupportedModelError
from tessera.models.loader import _safetensors_files, gather_part, map_hf_name, open_safetensors
from tessera.models.shard_writer import INDEX_FILE, ShardWriter
from tessera.quant.checkpoint import CheckpointLayout, LinearLayout, quantized_linear_names
from tessera.quant.quantize import QuantizedWeight, QuantSpec, quantize_weight

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_DENSE_GGML = ("F32", "F16", "BF16")


class _SafetensorsSource:
    def __init__(self, path: Path):
        self.path = path
        self.config = ModelConfig.from_dir(path)
        self.handles = {}
        for f in _safetensors_files(path):
            h, keys = open_safetensors(f)
            self.handles.update(dict.fromkeys(keys, h))

    def names(self) -> list[str]:
        return list(self.handles)

    def dense(self, name: str) -> torch.Tensor:
        try:
            return self.handles[name].get_tensor(name)
        except Exception as e:
            raise ModelLoadError(f"cannot read tensor {name!r} of {self.path}: {e}") from e

    def blocks(self, name: str) -> QuantizedWeight | None:
        return None

    def write_side_files(self, out: Path) -> None:
        for f in self.path.iterdir():  # config, generation config, tokenizer files: everything but weights
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX_FILE:
                shutil.copy2(f, out / f.name)


def _check_dense(cfg: ModelConfig) -> None:
    if cfg.moe is not None:  # stacked experts are no Linear layers (tessera/models/moe.py)
        raise UnsupportedModelError(f"{cfg.architecture} is a mixture of experts; quantizing one is not supported yet")


class _GGUFSource:
    def __init__(self, path: Path):
        from tessera.models.gguf import _ARCHS, _meta, gguf_config, hf_tensor_name, open_gguf

        self.path = path
        self.reader = open_gguf(path)
        self.raw_config = gguf_config(self.reader)
        self.config = ModelConfig.from_dict(self.raw_config)
        _check_dense(self.config)
        self.permuted = _ARCHS[_meta(self.reader, "general.architecture")][2]
        self.tensors = {hf_tensor_name(t.name): t for t in self.reader.tensors}

    def names(self) -> list[str]:
        return list(self.tensors)

    def dense(self, name: str) -> torch.Tensor:
        from tessera.models.gguf import hf_tensor

        return torch.from_numpy(np.ascontiguousarray(hf_tensor(self.tensors[name], self.raw_config, self.permuted)[1]))

    def blocks(self, name: str) -> QuantizedWeight | None:
        """The tensor's own blocks as bit planes (rows in HF order); None for a float tensor."""
        from tessera.models.gguf import unpermute_qk
        from tessera.quant.gguf_planes import blocks_to_quantized, permute_rows

        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind in _DENSE_GGML:
            return None
        n, k = (int(s) for s in reversed(t.shape.tolist()))
        try:
            qw = blocks_to_quantized(np.asarray(t.data), kind, n, k)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{self.path}: tensor {t.name!r}: {e}") from e
        heads = {"self_attn.q_proj": self.config.num_heads, "self_attn.k_proj": self.config.num_kv_heads}
        part = next((h for h in heads if f".{h}." in name), None)
        if self.permuted and part is not None:
            qw = permute_rows(qw, unpermute_qk(np.arange(n)[:, None], int(heads[part]))[:, 0])
        return qw

    def write_side_files(self, out: Path) -> None:
        from tessera.models.gguf import write_side_files

        write_side_files(self.path, self.reader, self.raw_config, out)


def _layer_groups(names: list[str]) -> Iterator[list[str]]:
    """The tensor names a layer at a time (decoder layers in order), then the others."""
    layers: dict[int, list[str]] = {}
    rest = []
    for n in names:
        m = _LAYER.match(n)
        (layers.setdefault(int(m.group(1)), []) if m else rest).append(n)
    for i in sorted(layers):
        yield layers[i]
    yield rest


def quantize_checkpoint(source: str | Path, out_dir: str | Path, spec: QuantSpec, lm_head: bool = False,
                        progress: bool = True) -> Path:
    """Write the quantized checkpoint of `source` (HF directory or .gguf) to `out_dir` (atomically)."""
    from tessera.models.gguf import staged_dir

    source, out_dir = Path(source).expanduser(), Path(out_dir).expanduser()
    if not source.exists():
        raise ModelLoadError(f"model path {str(source)!r} does not exist")
    is_gguf = source.is_file() and source.suffix.lower() == ".gguf"
    if spec.method == "gguf" and not is_gguf:
        raise UnsupportedModelError(f"quantization 'gguf' keeps a GGUF file's blocks; {source} is not a .gguf file")
    src = _GGUFSource(source) if is_gguf else _SafetensorsSource(source)
    cfg = src.config
    _check_dense(cfg)
    linears = set(quantized_linear_names(cfg, lm_head))
    layout = CheckpointLayout("gguf" if spec.method == "gguf" else f"bits:{spec.bits}", spec.method, spec.group_size,
                              lm_head, str(source.resolve()), source.stat().st_size if is_gguf else 0)
    with staged_dir(out_dir) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes=256 << 20)

        def emit(target: str, values: list) -> None:
            module = target.rsplit(".", 1)[0]
            if module in linears and target.endswith(".weight"):
                qw = _quantized(values, spec)
                if qw is not None:
                    layout.linears[module] = LinearLayout(qw.bits, qw.group_size, qw.k, qw.n)
                    for part in ("planes", "scale", "offset"):
                        writer.add(f"{module}.qweight.{part}", getattr(qw, part))
                    return
            writer.add(target, _dense(values))

        def read(name: str, keep_blocks: bool):
            """A GGUF linear's own blocks under quantization 'gguf' (None for a float tensor), else dense."""
            value = src.blocks(name) if keep_blocks and spec.method == "gguf" else None
            return src.dense(name) if value is None else value

        groups = list(_layer_groups(src.names()))
        for names in tqdm(groups, desc=f"quantizing {source.name} ({layout.quantization})", unit="layer",
                          disable=not progress):
            pending: dict[str, list] = {}
            for name in names:
                target, part = map_hf_name(name, cfg)
                if target is None:
                    continue
                value = read(name, keep_blocks=target.rsplit(".", 1)[0] in linears)
                if part is None:
                    emit(target, [value])
                    continue
                parts = gather_part(pending, target, part, value)
                if parts is not None:
                    emit(target, parts)
            if pending:
                raise ModelLoadError(f"{source}: fused weights with parts missing: {sorted(pending)}")
        if lm_head and cfg.tie_word_embeddings:  # the head reads the embeddings: quantize them for it
            embed = "model.embed_tokens.weight"
            emit("lm_head.weight", [read(embed, keep_blocks=True)])
        writer.close()
        src.write_side_files(tmp)
        layout.write(tmp)
    return out_dir


def _quantized(values: list, spec: QuantSpec) -> QuantizedWeight | None:
    """The parts of one linear weight as one QuantizedWeight; None when it stays dense (a GGUF's float
    tensor, or a fused weight whose parts mix floats and blocks)."""
    from tessera.quant.gguf_planes import stack_rows

    if all(isinstance(v, QuantizedWeight) for v in values):
        return values[0] if len(values) == 1 else stack_rows(values)
    if spec.method == "gguf":
        return None
    return quantize_weight(torch.cat(values) if len(values) > 1 else values[0], spec)


def _dense(values: list) -> torch.Tensor:
    ts = [v.dequantize() if isinstance(v, QuantizedWeight) else v for v in values]
    return torch.cat(ts) if len(ts) > 1 else ts[0]
