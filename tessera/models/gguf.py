"""Convert a GGUF checkpoint of a Llama-family decoder into an HF-style fp32 model directory.

The output directory holds ``config.json`` (HF config keys), ``generation_config.json``,
``model.safetensors`` (fp32, HF tensor names; shards and an index for large models) and, when the GGUF
carries tokenizer metadata, the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, chat
template). It is written to a temporary sibling directory and renamed into place, so an interrupted
conversion never leaves a half-written directory; ``CONVERSION_MARKER`` is the last file written.

llama.cpp's ``convert_hf_to_gguf.py`` permutes the rows of the Llama/Mistral q and k projections
(to its interleaved RoPE layout); :func:`unpermute_qk` undoes that. Qwen2/Qwen3 are not permuted.

Mixtures of experts: Mixtral (llama.cpp's ``llama`` architecture with ``expert_count``), ``qwen2moe``
and ``qwen3moe``. llama.cpp stores each layer's experts stacked (``ffn_gate_exps`` [E, F, H], ...);
they are written out one expert per HF tensor, as HF checkpoints hold them (:func:`hf_tensors`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf import quants as gguf_quants
from tqdm.auto import tqdm

from tessera.errors import ModelLoadError, UnsupportedModelError
from tessera.models.shard_writer import INDEX_FILE, SINGLE_FILE, ShardWriter

CONVERSION_MARKER = "tessera_conversion.json"
CONVERTER_VERSION = 1

# GGUF general.architecture -> (HF model_type, HF architecture class, q/k rows permuted by llama.cpp)
_ARCHS: dict[str, tuple[str, str, bool]] = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "mistral": ("mistral", "MistralForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM", False),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM", False),
}
# llama.cpp has no Mixtral architecture: a "llama" GGUF with experts is one.
_MIXTRAL = ("mixtral", "MixtralForCausalLM", True)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # MoE router
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",  # Qwen2-MoE's shared expert and its gate
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Stacked experts [E, rows, cols] -> each expert's HF projection: (Qwen's name, Mixtral's name).
_EXPERT_NAMES = {"ffn_gate_exps": ("gate_proj", "w1"), "ffn_up_exps": ("up_proj", "w3"),
                 "ffn_down_exps": ("down_proj", "w2")}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str:
    """Map a GGUF tensor name (``blk.3.attn_q.weight``) to its HF name; raise if unknown."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    if gguf_name.startswith("rope_freqs"):
        raise UnsupportedModelError(
            f"tensor {gguf_name!r}: llama3-style RoPE frequency factors are not supported"
        )
    raise UnsupportedModelError(f"tensor {gguf_name!r} has no known HF equivalent")


def hf_expert_names(gguf_name: str, num_experts: int, mixtral: bool) -> list[str] | None:
    """The HF names of a stacked-experts GGUF tensor (``blk.3.ffn_gate_exps.weight``), one per expert,
    or None when it is not one."""
    m = _LAYER_RE.fullmatch(gguf_name)
    if not m or m.group(2) not in _EXPERT_NAMES or m.group(3) != "weight":
        return None
    proj = _EXPERT_NAMES[m.group(2)][1 if mixtral else 0]
    block = "block_sparse_moe" if mixtral else "mlp"
    return [f"model.layers.{m.group(1)}.{block}.experts.{e}.{proj}.weight" for e in range(num_experts)]


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)``."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_SUPPORTED_TYPES: dict[GGMLQuantizationType, bool] = {}


def _type_supported(qtype: GGMLQuantizationType) -> bool:
    """Whether ``gguf.quants.dequantize`` handles ``qtype`` (probed once on one zero block)."""
    if qtype not in _SUPPORTED_TYPES:
        try:
            _, type_size = GGML_QUANT_SIZES[qtype]
            gguf_quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
            _SUPPORTED_TYPES[qtype] = True
        except (NotImplementedError, KeyError):
            _SUPPORTED_TYPES[qtype] = False
    return _SUPPORTED_TYPES[qtype]


def dequantize_tensor(t: ReaderTensor) -> np.ndarray:
    """Dequantize a GGUF tensor to fp32 in numpy (HF) shape order."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    out = gguf_quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
    if out.dtype != np.float32 or not out.flags.writeable or not out.flags.c_contiguous:
        out = np.array(out, dtype=np.float32, order="C")  # F32 tensors come back as memmap views
    return out


def open_gguf(path: str | Path) -> GGUFReader:
    """Open a GGUF file, turning any parse failure into :class:`ModelLoadError`."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, struct/numpy errors... on corrupt input
        raise ModelLoadError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from e
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            raise ModelLoadError(f"{path}: tensor {t.name!r} is truncated (file cut short?)")
    return reader


def _meta(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(x: float) -> float:
    """A GGUF float32 as the shortest decimal that round-trips (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def gguf_config(reader: GGUFReader) -> dict[str, Any]:
    """Build the HF ``config.json`` dict from GGUF metadata (and the tensor inventory)."""
    arch = _meta(reader, "general.architecture")
    if arch not in _ARCHS:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(_ARCHS)})"
        )
    model_type, hf_arch, _ = _arch_entry(reader)
    names = {t.name: t for t in reader.tensors}

    def req(key: str) -> Any:
        value = _meta(reader, f"{arch}.{key}")
        if value is None:
            raise ModelLoadError(f"GGUF metadata is missing {arch}.{key}")
        return value

    hidden = int(req("embedding_length"))
    n_head = int(req("attention.head_count"))
    head_dim = _meta(reader, f"{arch}.attention.key_length")
    if head_dim is None and _ARCHS[arch][2]:
        head_dim = _meta(reader, f"{arch}.rope.dimension_count")
    if "token_embd.weight" not in names:
        raise ModelLoadError("GGUF has no token_embd.weight tensor")
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_meta(reader, f"{arch}.feed_forward_length")
                                 or _meta(reader, f"{arch}.expert_feed_forward_length") or req("feed_forward_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_meta(reader, f"{arch}.attention.head_count_kv", n_head)),
        "head_dim": int(head_dim) if head_dim is not None else hidden // n_head,
        "rms_norm_eps": _f32(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(_meta(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_meta(reader, f"{arch}.context_length", 2048)),
        "vocab_size": int(names["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if model_type in ("llama", "qwen3", "mixtral", "qwen3_moe"):
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    if model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
        cfg.update(_moe_config(reader, arch, model_type, names))
    for key, cfg_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = _meta(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[cfg_key] = int(value)
    scaling = _meta(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling not in ("linear", "yarn"):
            raise UnsupportedModelError(f"RoPE scaling type {scaling!r} is not supported")
        rope: dict[str, Any] = {"rope_type": scaling, "factor": float(req("rope.scaling.factor"))}
        orig = _meta(reader, f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            rope["original_max_position_embeddings"] = int(orig)
        cfg["rope_scaling"] = rope
    return cfg


def _arch_entry(reader: GGUFReader) -> tuple[str, str, bool]:
    """(HF model_type, HF architecture class, q/k permuted) of the file's general.architecture."""
    arch = _meta(reader, "general.architecture")
    if arch == "llama" and _meta(reader, "llama.expert_count"):
        return _MIXTRAL
    return _ARCHS[arch]


def _moe_config(reader: GGUFReader, arch: str, model_type: str, names: dict) -> dict[str, Any]:
    """The HF config keys of a mixture of experts. llama.cpp always renormalises Mixtral's and
    Qwen3-MoE's top-k weights and never Qwen2-MoE's, unless the file says (expert_weights_norm)."""
    experts, used = _meta(reader, f"{arch}.expert_count"), _meta(reader, f"{arch}.expert_used_count")
    if not experts or not used:
        raise ModelLoadError(f"GGUF metadata of the mixture of experts lacks {arch}.expert_count/expert_used_count")
    norm = _meta(reader, f"{arch}.expert_weights_norm")
    cfg: dict[str, Any] = {"num_experts_per_tok": int(used),
                           "norm_topk_prob": bool(model_type != "qwen2_moe" if norm is None else norm)}
    if model_type == "mixtral":
        cfg["num_local_experts"] = int(experts)
        return cfg
    cfg["num_experts"] = int(experts)
    cfg["moe_intermediate_size"] = int(_meta(reader, f"{arch}.expert_feed_forward_length")
                                       or names["blk.0.ffn_gate_exps.weight"].shape[1])
    if model_type == "qwen2_moe":
        shared = _meta(reader, f"{arch}.expert_shared_feed_forward_length")
        if shared is None and "blk.0.ffn_gate_shexp.weight" in names:
            shared = names["blk.0.ffn_gate_shexp.weight"].shape[1]
        cfg["shared_expert_intermediate_size"] = int(shared or 0)
        cfg["qkv_bias"] = "blk.0.attn_q.bias" in names
    return cfg


def _save_tokenizer(gguf_path: Path, reader: GGUFReader, out: Path, max_len: int) -> bool:
    """Convert the GGUF's tokenizer with transformers; return False when the file has none."""
    if "tokenizer.ggml.model" not in reader.fields:
        return False
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:
        raise UnsupportedModelError(f"{gguf_path}: cannot convert the GGUF tokenizer ({e})") from e
    template = _meta(reader, "tokenizer.chat_template")
    if template is not None:
        tok.chat_template = template
    tok.model_max_length = max_len
    tok.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    if cfg_path.is_file():  # drop loader-only flags transformers leaks into the saved config
        tcfg = json.loads(cfg_path.read_text())
        for key in ("is_local", "local_files_only"):
            tcfg.pop(key, None)
        cfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    return True


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` dir to ``out_dir``, replacing any previous conversion."""
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():  # mkdtemp / safetensors create owner-only files
        f.chmod(0o666 & ~umask)
    tmp.chmod(0o777 & ~umask)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_converted(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a complete conversion."""
    out_dir = Path(out_dir)
    weights = (out_dir / SINGLE_FILE).is_file() or (out_dir / INDEX_FILE).is_file()
    return weights and all((out_dir / f).is_file() for f in (CONVERSION_MARKER, "config.json"))


@contextmanager
def staged_dir(out_dir: Path):
    """A temporary sibling of ``out_dir`` to write into, moved into place when the block finishes and
    removed if it fails: an interrupted conversion never leaves a half-written directory."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_side_files(gguf_path: Path, reader: GGUFReader, config: dict[str, Any], out: Path) -> bool:
    """config.json, generation_config.json and the tokenizer files; returns whether there is a tokenizer."""
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    pad = _meta(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        gen["pad_token_id"] = int(pad)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return _save_tokenizer(gguf_path, reader, out, config["max_position_embeddings"])


def hf_tensors(t: ReaderTensor, config: dict[str, Any], permuted: bool) -> list[tuple[str, np.ndarray]]:
    """A GGUF tensor as HF tensors: itself (hf_tensor), or one per expert for stacked experts."""
    experts = _expert_names(t.name, config)
    if experts is None:
        return [hf_tensor(t, config, permuted)]
    w = dequantize_tensor(t)
    if w.shape[0] != len(experts):
        raise ModelLoadError(f"tensor {t.name!r} stacks {w.shape[0]} experts; the metadata says {len(experts)}")
    return list(zip(experts, w, strict=True))


def _expert_names(gguf_name: str, config: dict[str, Any]) -> list[str] | None:
    num = config.get("num_local_experts") or config.get("num_experts")
    return hf_expert_names(gguf_name, num, config["model_type"] == "mixtral") if num else None


def hf_tensor(t: ReaderTensor, config: dict[str, Any], permuted: bool) -> tuple[str, np.ndarray]:
    """A GGUF tensor as (HF name, fp32 values in HF row order)."""
    w = dequantize_tensor(t)
    if permuted and ".attn_q." in t.name:
        w = unpermute_qk(w, config["num_attention_heads"])
    elif permuted and ".attn_k." in t.name:
        w = unpermute_qk(w, config["num_key_value_heads"])
    return hf_tensor_name(t.name), w


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Convert ``gguf_path`` into an HF-style fp32 model directory at ``out_dir``; return ``out_dir``.

    Streams: each tensor is dequantized and written out in shards (tessera.models.shard_writer), so
    memory holds one shard, not the model. Raises :class:`ModelLoadError` for a missing/corrupt/truncated
    file and :class:`UnsupportedModelError` for an unknown architecture, tensor or quantization type.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_gguf(gguf_path)
    config = gguf_config(reader)
    permuted = _arch_entry(reader)[2]
    for t in reader.tensors:  # validate everything before the slow part
        if _expert_names(t.name, config) is None:
            hf_tensor_name(t.name)
        if not _type_supported(t.tensor_type):
            raise UnsupportedModelError(
                f"tensor {t.name!r} uses GGML type {t.tensor_type.name}, which tessera cannot dequantize"
            )
    with staged_dir(out_dir) as tmp:
        writer = ShardWriter(tmp)
        for t in tqdm(reader.tensors, desc=f"converting {gguf_path.name}", unit="tensor", disable=not progress):
            for name, w in hf_tensors(t, config, permuted):
                writer.add(name, torch.from_numpy(np.ascontiguousarray(w)))
        writer.close()
        has_tokenizer = write_side_files(gguf_path, reader, config, tmp)
        marker = {
            "converter_version": CONVERTER_VERSION,
            "source": str(gguf_path.resolve()),
            "source_size": gguf_path.stat().st_size,
            "tokenizer": has_tokenizer,
            "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
        }
        (tmp / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out_dir
