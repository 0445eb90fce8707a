"""Model and engine configuration: typed dataclasses read from an HF `config.json`."""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tessera.config_args import add_config_args, arg, config_kwargs
from tessera.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError

# HF architecture name -> what the shared Llama-family implementation must switch on.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    # Mixtures of experts (tessera/models/moe.py): the same attention, a routed MoE block as the MLP.
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


@dataclass(frozen=True)
class MoeConfig:
    """A mixture-of-experts MLP: each token takes the top-k of `num_experts` SwiGLU experts.

    Routing, as every supported model defines it: softmax over all experts (in fp32), top-k of the
    probabilities, then renormalised to sum to 1 when `norm_topk_prob` (always for Mixtral; a config
    field for Qwen2/3-MoE). Qwen2-MoE adds a shared expert to every token, scaled by sigmoid(gate(x))."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    # Layers whose MLP is dense (Qwen's mlp_only_layers and decoder_sparse_step), the rest are sparse.
    dense_layers: tuple[int, ...] = ()

    def is_sparse(self, layer_idx: int) -> bool:
        return layer_idx not in self.dense_layers

    @classmethod
    def from_dict(cls, raw: dict, family: str, num_layers: int) -> MoeConfig:
        num_experts = int(raw.get("num_local_experts") or raw.get("num_experts") or 0)
        top_k = int(raw["num_experts_per_tok"])
        if num_experts <= 0 or not 0 < top_k <= num_experts:
            raise ModelLoadError(f"bad MoE config: {num_experts} experts, {top_k} per token")
        if family == "mixtral":
            return cls(num_experts, top_k, int(raw["intermediate_size"]), norm_topk_prob=True)
        step = int(raw.get("decoder_sparse_step", 1) or 1)
        only_mlp = set(raw.get("mlp_only_layers") or ())
        dense = tuple(i for i in range(num_layers) if i in only_mlp or (i + 1) % step != 0)
        return cls(num_experts, top_k, int(raw["moe_intermediate_size"]),
                   norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
                   shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0)
                   if family == "qwen2_moe" else 0,
                   dense_layers=dense)


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    moe: MoeConfig | None = None  # a mixture of experts (tessera/models/moe.py)

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or raw.get('model_type')!r}; "
                f"tessera supports {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            head_dim = raw.get("head_dim") or hidden // heads
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            sliding = raw.get("sliding_window")
            # Qwen2/3 configs carry a sliding_window that is off unless use_sliding_window is set.
            if family.startswith(("qwen2", "qwen3")) and not raw.get("use_sliding_window", False):
                sliding = None
            return cls(
                architecture=arch,
                family=family,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                rope=_rope_from_dict(raw),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=family == "qwen2" or (family == "qwen2_moe" and bool(raw.get("qkv_bias", True)))
                or bool(raw.get("attention_bias", False)),
                o_bias=not family.startswith("qwen2") and bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                qk_norm=family in ("qwen3", "qwen3_moe"),
                sliding_window=int(sliding) if sliding else None,
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
                moe=MoeConfig.from_dict(raw, family, int(raw["num_hidden_layers"]))
                if family in ("mixtral", "qwen2_moe", "qwen3_moe") else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"config.json is missing or has a bad field: {e!r}") from e

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        cfg = Path(path) / "config.json"
        if not cfg.is_file():
            raise ModelLoadError(f"no config.json in model directory {str(path)!r}")
        try:
            raw = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read {cfg}: {e}") from e
        return cls.from_dict(raw)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _rope_from_dict(raw: dict) -> RopeConfig:
    # transformers >= 5 folds theta and scaling into `rope_parameters`; older configs use
    # `rope_theta` + `rope_scaling`. Read both.
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(f"unsupported rope scaling type {rope_type!r}")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            merged.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


# How expert-parallel ranks move tokens to their experts (EngineConfig.moe_dispatch, tessera/moe/token_flow.py).
MOE_DISPATCH = ("allreduce", "exflow", "all-to-all")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_models(spec) -> dict[str, str]:
    """`a=path,b=path` (the CLI's --models; repeated flags are joined) or a dict -> {name: path}, in order."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        parts = [p for s in ([spec] if isinstance(spec, str) else spec) for p in str(s).split(",") if p.strip()]
        items = []
        for p in parts:
            name, sep, path = p.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise InvalidRequestError(f"--models entry {p!r} is not name=path")
            items.append((name.strip(), path.strip()))
    out: dict[str, str] = {}
    for name, path in items:
        if not isinstance(name, str) or not name or not isinstance(path, str | Path) or not str(path):
            raise InvalidRequestError(f"models: {name!r}: {path!r} is not a name and a checkpoint path")
        if name in out:
            raise InvalidRequestError(f"models: the name {name!r} is given twice")
        out[name] = str(path)
    if len(out) < 1:
        raise InvalidRequestError("models: give at least one name=path")
    return out


def parse_memory_size(text) -> int:
    """Bytes from an int or a string: '2000000', '2e9', '512MB', '2GiB' (KB/MB/GB/TB powers of 10,
    KiB/MiB/GiB/TiB powers of 2, case-insensitive)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (give bytes, or e.g. 512MB, 2GiB)")
    try:
        return int(float(m.group(1)) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (give bytes, or e.g. 512MB, 2GiB)") from None


def _bytes_or_fraction(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        return parse_memory_size(text)  # with a unit: bytes
    return int(value) if value > 1 else value


@dataclass
class EngineConfig:
    """Everything the engine needs besides the weights. Field names follow vLLM's. Each field with a
    help text is a flag of every command that runs an engine (`add_engine_args`, tessera/config_args.py)."""

    model: str | None = arg(None, "HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    dtype: str = arg("auto", "auto: bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), float32 "
                     "otherwise", choices=("auto", *DTYPES))
    device: str = arg("auto", "auto, cpu or cuda")
    max_num_seqs: int = arg(256, "sequences scheduled at once")
    max_num_batched_tokens: int = arg(2048, "tokens one step computes (a prefill chunk's budget)")
    mixed_prefill_tokens: int | None = arg(None, "prompt tokens a step that carries running decodes may compute, "
                                           "which bounds the gap between a stream's tokens while prompts arrive "
                                           "(default and 0: no cap; on a server a cap also admits waiting "
                                           "prompts shortest first, with aging)")
    prefill_first: bool = arg(False, "a step that can compute prompt tokens computes only those and the running "
                              "decodes take the next step alone (vLLM V0's order; decodes never wait two steps): "
                              "a first token waits for its prefill, not for the decodes beside it")
    kv_cache_memory: float | int | None = arg(None, "KV cache size in bytes, or a fraction (<= 1) of free memory",
                                              type=_bytes_or_fraction)
    block_size: int = arg(16, "tokens per KV cache block")
    enforce_eager: bool = arg(False, "never capture CUDA graphs (on CUDA, decode-only steps otherwise replay a graph "
                                     "per batch-size bucket: tessera/engine/cuda_graphs.py)")
    enable_prefix_caching: bool = arg(True, "the automatic prefix cache (default: on)",
                                      flags=("--enable-prefix-caching", "--prefix-caching"))
    prefix_planning: str = arg("auto", "offline batches: plan shared prefixes globally (auto: when prefix caching "
                               "is on)", choices=("auto", "on", "off"))
    max_model_len: int | None = arg(None, "longest sequence, prompt and output (default: the model's)")
    seed: int = arg(0, "seed of the engine's sampling")
    num_threads: int | None = arg(None, "CPU threads (default: torch's)")
    generation_config: str = arg("auto", "auto: default sampling values (temperature, top_p, top_k, min_p, "
                                 "repetition_penalty, max_new_tokens) from the model's generation_config.json for "
                                 "requests that leave them unset, as vLLM; vllm: tessera's own defaults",
                                 choices=("auto", "vllm"))
    quantization: str | None = arg(None, "bits:N (N = 1..8): weights quantized at load to N-bit bit planes "
                                   "(bipolar-INT); gguf: a GGUF file's own blocks (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, "
                                   "Q2_K..Q6_K) kept as bit planes. The embeddings (and the LM head, see "
                                   "--quantize-lm-head) stay in the compute dtype. A checkpoint written by "
                                   "`tessera quantize` carries its own: leave this unset")
    quantization_group_size: int = arg(64, "weights per quantization group (one scale and offset each); a "
                                       "multiple of 16 that divides 64 or is a multiple of it")
    quantization_method: str = arg("rtn", "rtn: round to nearest; hqq: HQQ's error-minimizing offsets "
                                   "(calibration-free, better at low widths)", choices=("rtn", "hqq"))
    activation_bits: int | None = arg(None, "with --quantization, 8: each row of activations rounded to int8 per "
                                      "weight group for the quantized products, which become integer dot products (as "
                                      "llama.cpp's Q8 activations): faster where the CPU lacks bf16 dot products, "
                                      "not exact (prefill-sized steps of bf16/fp16 take the exact path's dequantized "
                                      "weight); unset: exact products", zero_is_none=True)
    quantize_lm_head: bool = arg(False, "with --quantization, quantize the LM head too (bits:N: to N bits; gguf: the "
                                 "file's output blocks, or its token embedding's when tied); the embeddings stay")
    enable_lora: bool = arg(False, "serve LoRA adapters (PEFT) on top of the model; a batch mixes adapters and the "
                            "base model")
    max_loras: int = arg(4, "with --enable-lora, adapters resident on the device at once (and running at once)")
    max_lora_rank: int = arg(16, "with --enable-lora, the largest adapter rank accepted (the slots' width)")
    max_cpu_loras: int | None = arg(None, "with --enable-lora, adapters kept in host memory (default: max_loras; "
                                    "others are read from disk again when needed)", zero_is_none=True)
    weight_memory: int | None = arg(None, "resident weight budget in bytes (or 2GiB, 512MB): the embeddings, LM head, "
                                    "norms and as many decoder layers as fit stay in memory, the rest stream from "
                                    "disk each step through two layer buffers (counted in the budget) while the "
                                    "layer before computes (tessera/offload); with --quantization or a quantized "
                                    "checkpoint the layers are held and streamed quantized. Independent of "
                                    "--kv-cache-memory",
                                    type=parse_memory_size)
    tensor_parallel_size: int = arg(1, "ranks the model is split across (attention heads, KV heads and the MLP; "
                                    "one all-reduce per attention block and per MLP); worker processes are started "
                                    "by the engine, or taken from torchrun's environment (tessera/distributed)")
    sequence_parallel_size: int = arg(1, "ranks a long prompt's prefill is split across (zig-zag token split, ring "
                                      "attention between ranks); decode runs on rank 0 (tessera/distributed)")
    sequence_parallel_mode: str = arg("tokenring", "with --sequence-parallel-size: ring (K/V passed around the ring) "
                                      "or tokenring (Q sent forward, partial outputs and their log-sum-exp sent "
                                      "back, both overlapped with compute)", choices=("ring", "tokenring"))
    expert_parallel_size: int = arg(1, "ranks a mixture of experts' experts are spread across (each rank holds its "
                                    "share of every MoE layer's experts, attention and the rest replicated; one "
                                    "all-reduce per MoE layer sums the ranks' expert outputs); worker processes as "
                                    "for --tensor-parallel-size (tessera/distributed/expert_parallel.py)")
    moe_placement: str | None = arg(None, "with --expert-parallel-size: a placement JSON (`tessera moe-place`) saying "
                                    "which rank holds each expert of each MoE layer (default: round-robin, expert e "
                                    "on rank e mod N)")
    moe_dispatch: str = arg("allreduce", "with --expert-parallel-size, how tokens meet their experts: allreduce "
                            "(every rank runs every token's attention, one all-reduce per MoE layer sums the "
                            "experts' outputs), exflow (each rank runs attention for the tokens that live on it, "
                            "the step's new K/V all-gathered so every cache stays whole; at an MoE layer a token "
                            "moves once, to its primary expert's rank, and stays there) or all-to-all (attention "
                            "where the sequence lives, tokens sent to their experts and back) "
                            "(tessera/moe/token_flow.py)", choices=MOE_DISPATCH)
    distributed_timeout_s: float = arg(300.0, "with several ranks: seconds a collective inside a step may wait for "
                                       "the other ranks before the engine gives up with an error")
    models: dict[str, str] | None = arg(None, "several full fine-tunes of one architecture on one engine, name=path,"
                                        "name=path: their identical blocks (linears, norms, embeddings) stored once "
                                        "and run once per step for all of them (tessera.blockllm); a request's model "
                                        "picks one (default: the first). Replaces --model", type=parse_models)
    extra: dict = field(default_factory=dict)

    @property
    def parallel_size(self) -> int:
        """Ranks the engine runs on (1: single process)."""
        return max(self.tensor_parallel_size, self.sequence_parallel_size, self.expert_parallel_size)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineConfig:
        return cls(**engine_kwargs(args))

    def validate(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise InvalidRequestError(f"{name} must be a positive integer, got {v!r}")
        cap = self.mixed_prefill_tokens
        if cap is not None and (not isinstance(cap, int) or cap < 0):
            raise InvalidRequestError(f"mixed_prefill_tokens must be a non-negative integer (0: no cap), got {cap!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.prefix_planning not in ("auto", "on", "off"):
            raise InvalidRequestError(f"prefix_planning must be auto, on or off; got {self.prefix_planning!r}")
        if self.generation_config not in ("auto", "vllm"):
            raise InvalidRequestError(f"generation_config must be auto or vllm; got {self.generation_config!r}")
        for name in ("max_loras", "max_lora_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InvalidRequestError(f"{name} must be a positive integer, got {v!r}")
        if self.max_cpu_loras is not None and (not isinstance(self.max_cpu_loras, int)
                                               or self.max_cpu_loras < self.max_loras):
            raise InvalidRequestError(f"max_cpu_loras must be an integer >= max_loras ({self.max_loras}), "
                                      f"got {self.max_cpu_loras!r}")
        self._validate_parallel()
        if self.models is not None:
            self.models = parse_models(self.models)
            first = next(iter(self.models.values()))
            if self.model is not None and self.model != first:
                raise InvalidRequestError("give either model or models (the first of models is loaded as the model)")
            self.model = first
            for name, other in (("enable_lora", self.enable_lora), ("weight_memory", self.weight_memory),
                                ("quantization", self.quantization),
                                ("several ranks", self.parallel_size > 1)):
                if other:
                    raise InvalidRequestError(f"models (block sharing) does not run with {name} yet")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise InvalidRequestError(f"kv_cache_memory must be positive, got {self.kv_cache_memory!r}")
        if self.weight_memory is not None:
            try:
                self.weight_memory = parse_memory_size(self.weight_memory)
            except argparse.ArgumentTypeError as e:
                raise InvalidRequestError(f"weight_memory: {e}") from None
            if self.weight_memory <= 0:
                raise InvalidRequestError(f"weight_memory must be positive, got {self.weight_memory!r}")
        self.quant_spec()

    def _validate_parallel(self) -> None:
        for name in ("tensor_parallel_size", "sequence_parallel_size", "expert_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InvalidRequestError(f"{name} must be a positive integer, got {v!r}")
        if self.sequence_parallel_mode not in ("ring", "tokenring"):
            raise InvalidRequestError(f"sequence_parallel_mode must be ring or tokenring, got "
                                      f"{self.sequence_parallel_mode!r}")
        if self.distributed_timeout_s <= 0:
            raise InvalidRequestError(f"distributed_timeout_s must be positive, got {self.distributed_timeout_s!r}")
        if self.moe_dispatch not in MOE_DISPATCH:
            raise InvalidRequestError(f"moe_dispatch must be one of {', '.join(MOE_DISPATCH)}; "
                                      f"got {self.moe_dispatch!r}")
        if self.moe_dispatch != "allreduce" and self.expert_parallel_size == 1:
            raise InvalidRequestError(f"moe_dispatch={self.moe_dispatch} moves tokens between expert-parallel ranks: "
                                      "it needs expert_parallel_size > 1")
        if self.moe_placement is not None and self.expert_parallel_size == 1:
            raise InvalidRequestError("moe_placement places experts over ranks: it needs expert_parallel_size > 1")
        if self.parallel_size == 1:
            return
        several = [name for name in ("tensor_parallel_size", "sequence_parallel_size", "expert_parallel_size")
                   if getattr(self, name) > 1]
        if len(several) > 1:
            raise InvalidRequestError(f"{' and '.join(several)} cannot both be > 1 yet")
        for name in ("enable_lora", "weight_memory"):
            if getattr(self, name):
                raise InvalidRequestError(f"{name} is not supported with tensor or sequence parallelism yet")

    def quant_spec(self):
        """The parsed `quantization` (a tessera.quant.QuantSpec), or None for full-width weights."""
        if self.quantization is None:
            for name in ("quantize_lm_head", "activation_bits"):
                if getattr(self, name):
                    raise InvalidRequestError(f"{name} needs a quantization (bits:N or gguf)")
            return None
        from tessera.quant.quantize import QuantSpec

        spec = QuantSpec.parse(self.quantization, self.quantization_group_size, self.quantization_method)
        return spec.with_activations(self.activation_bits)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except RuntimeError as e:
            raise InvalidRequestError(f"invalid device {self.device!r}") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InvalidRequestError("device 'cuda' was asked for but no CUDA device is available")
        return dev

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            if device.type == "cuda":
                return torch.bfloat16
            from tessera.cpu_features import has_native_bf16

            # Where bf16 is emulated it is slower than fp32; where it is native, GEMMs run ~4x fp32.
            # TESSERA_AUTO_CPU_DTYPE pins what "auto" means on CPUs (the test suite pins float32, the
            # exactness reference).
            pinned = os.environ.get("TESSERA_AUTO_CPU_DTYPE")
            if pinned:
                if pinned not in DTYPES:
                    raise InvalidRequestError(f"TESSERA_AUTO_CPU_DTYPE must be one of {', '.join(DTYPES)}")
                return DTYPES[pinned]
            return torch.bfloat16 if has_native_bf16() else torch.float32
        return DTYPES[self.dtype]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine's flags, one per EngineConfig field: --max-num-seqs, --kv-cache-memory, ..."""
    add_config_args(parser.add_argument_group("engine"), EngineConfig)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig's (and LLM's) keyword arguments from parsed engine flags."""
    return config_kwargs(args, EngineConfig)


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil  # Linux (MemAvailable), macOS and Windows alike

    return int(psutil.virtual_memory().available)
