"""LLMEngine: owns the model, the KV pool, the scheduler and the sampler, and advances every request
by one step per call. `LLM` (offline) and the server's async loop both drive it."""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tessera.config import EngineConfig, ModelConfig, available_memory_bytes
from tessera.engine.block_manager import BlockManager
from tessera.engine.guided import GrammarCache
from tessera.engine.migration import KVCopy, SeqState, read_kv, write_kv
from tessera.engine.model_runner import ModelRunner
from tessera.engine.output_processor import OutputProcessor
from tessera.engine.sampler import Sampler
from tessera.engine.scheduler import Scheduler
from tessera.engine.sequence import Sequence
from tessera.engine.token_constraints import TokenConstraints
from tessera.errors import InvalidRequestError, OutOfKVCacheError, PromptTooLongError
from tessera.generation_config import load_generation_defaults
from tessera.models.loader import load_model, resolve_model_path
from tessera.outputs import CompletionOutput, Logprob, RequestOutput
from tessera.quant.checkpoint import load_quantized_model, read_layout
from tessera.sampling_params import SamplingParams
from tessera.tokenizer import check_text, load_tokenizer

log = logging.getLogger("tessera")

_CPU_DEFAULT_KV_BYTES = 4 << 30  # pages are committed only as the cache fills


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    stream: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    prompt_logprobs_decoded: bool = False  # decoded_token filled in on the first sequence's prompt logprobs
    error: str | None = None  # why the engine failed it (finish_reason "error"), for the caller
    # When the failure is the request's own (a TesseraError: its adapter cannot be loaded), not the engine's.
    error_cause: Exception | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


def _why_auto_dtype(device: torch.device, dtype: torch.dtype) -> str:
    if device.type != "cpu":
        return "the GPU default"
    from tessera.cpu_features import describe

    if os.environ.get("TESSERA_AUTO_CPU_DTYPE"):
        return "pinned by TESSERA_AUTO_CPU_DTYPE"
    info = describe()
    native = [f for f in ("avx512_bf16", "amx_bf16", "bf16") if f in info["flags"]]
    return f"native bf16: {', '.join(native)}" if native else "no native bf16 on this CPU; pass dtype to override"


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True):
        config.validate()
        self.config = config
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        if config.dtype == "auto":
            log.info("dtype auto: %s on %s (%s)", str(self.dtype).removeprefix("torch."), self.device,
                     _why_auto_dtype(self.device, self.dtype))
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads or torch.get_num_threads())
        t0 = time.perf_counter()
        quant = config.quant_spec()
        if quant is not None and quant.method == "gguf":  # the file's blocks, as a quantized checkpoint
            from tessera.models.default_model import quantized_gguf_dir

            self.model_path = quantized_gguf_dir(self._gguf_source(), config.quantize_lm_head, progress)
        else:
            self.model_path = resolve_model_path(config.model)
        layout = read_layout(self.model_path)
        if layout is not None:
            quant = self._checkpoint_spec(layout, quant).with_activations(config.activation_bits)
        self.model_config = ModelConfig.from_dir(self.model_path)
        if self.model_config.moe is not None:
            self._check_moe_options(config, quant, layout)
        self.max_model_len = self._resolve_max_model_len()
        self.ranks = None  # a tessera.distributed.launch.EngineRanks with several ranks
        if config.parallel_size > 1:
            self._start_ranks(quant, layout)
        try:
            self._build(config, quant, layout, progress, t0)
        except BaseException:
            if self.ranks is not None:  # the workers wait for the engine that failed: stop them
                self.ranks.shutdown()
            raise

    def _build(self, config: EngineConfig, quant, layout, progress: bool, t0: float) -> None:
        """The rest of __init__: tokenizer, weights, KV cache, runner, scheduler, sampler."""
        self.tokenizer = load_tokenizer(self.model_path)
        # SamplingParams keywords from generation_config.json, for requests that leave them unset (vLLM's)
        self.generation_defaults = load_generation_defaults(self.model_path, config.generation_config)
        # bits:N from a dense checkpoint, resident: the streaming loader with no budget quantizes each layer as
        # its tensors are read, so the dense model is never whole in memory (CPU, one rank, dense MLPs: where
        # that loader runs).
        quantize_at_load = (quant is not None and quant.method != "gguf" and layout is None and self.ranks is None
                            and self.device.type == "cpu" and self.model_config.moe is None)
        if config.weight_memory is None and not quantize_at_load:
            load = load_model if layout is None else load_quantized_model
            self.model = load(self.model_path, self.model_config, self.max_model_len, self.device, self.dtype,
                              progress=progress)
        else:  # a weight budget (the layers that do not fit stream from disk: tessera/offload), or quantize_at_load
            from tessera.offload import WeightSource, load_streamed_model

            # Quantized: a quantized checkpoint's planes as they are, else the dense weights quantized at load.
            source = WeightSource(quant=quant if layout is None else None, checkpoint=layout)
            self.model = load_streamed_model(self.model_path, self.model_config, self.max_model_len, self.device,
                                             self.dtype, config.weight_memory, progress=progress, source=source)
        if self.ranks is not None:
            self.model = self.ranks.prepare_model(self.model)  # tensor parallel: this rank's shard
        self.weight_streamer = getattr(self.model, "weight_streamer", None)
        self.load_time = time.perf_counter() - t0
        num_blocks = self._num_kv_blocks()
        if quant is not None and (config.quantize_lm_head or (layout is not None and layout.lm_head)):
            self.model.lm_head.quantize = True  # the embedding lookup keeps the dense matrix even when tied
        self.lora = None  # a tessera.lora.LoRAManager with enable_lora
        if config.enable_lora:
            from tessera.lora.manager import LoRAManager

            self.lora = LoRAManager(self.model, self.model_config, config.max_loras, config.max_lora_rank,
                                    config.max_cpu_loras, self.device, self.dtype)
            log.info("LoRA: %d slots of rank %d (%.1f MiB)", config.max_loras, config.max_lora_rank,
                     self.lora.slot_bytes / 2**20)
        self.variants = None  # a tessera.blockllm.VariantSet with several models (block sharing)
        if config.models:
            from tessera.blockllm import load_variants

            self.variants = load_variants(config.models, self.model, self.model_config, self.dtype, self.device,
                                          progress)
        if self.ranks is not None:
            self.runner = self.ranks.runner(self.model, num_blocks, config.block_size, self.dtype)
        else:
            self.runner = ModelRunner(self.model, num_blocks, config.block_size, self.device, self.dtype,
                                      quantization=quant, progress=progress, lora=self.lora,
                                      allow_packing=config.weight_memory is None, variants=self.variants)
            if self.device.type == "cuda" and not config.enforce_eager:
                self._capture_graphs()
        if quant is not None:
            from tessera.quant.bits_linear import quantized_bytes

            q, dense = quantized_bytes(self.model)
            log.info("weights: %s: %.1f MiB of bit planes and scales + %.1f MiB dense (embeddings, LM head, norms)",
                     self.runner.linear_method.name, q / 2**20, dense / 2**20)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        step_tokens = config.max_num_batched_tokens
        if self.weight_streamer is not None:
            from tessera.offload import streaming_token_budget

            step_tokens = streaming_token_budget(step_tokens)  # throughput mode: one weight pass per step
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, step_tokens,
                                   max_loras=config.max_loras if config.enable_lora else 0,
                                   mixed_prefill_tokens=config.mixed_prefill_tokens or None,
                                   prefill_first=config.prefill_first)
        self.sampler = Sampler(config.seed)
        self.output_processor = OutputProcessor(self.tokenizer, lambda: self.eos_token_ids)
        # Structured output: grammars compiled against the tokenizer, masks as wide as the logits.
        self.grammars = GrammarCache(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids))
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._req_ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}
        cap = self.block_manager.num_blocks * config.block_size
        log.info("loaded %s (%s, %s on %s) in %.1fs; KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB)",
                 self.model_path.name, self.model_config.architecture, str(self.dtype).removeprefix("torch."),
                 self.device, self.load_time, self.block_manager.num_blocks, config.block_size, cap,
                 self.runner.kv_cache.numel() * self.runner.kv_cache.element_size() / 2**30)

    def _capture_graphs(self) -> None:
        from tessera.engine.cuda_graphs import DecodeGraphs, unsupported_reason

        reason = unsupported_reason(self.runner)
        if reason is not None:
            log.info("CUDA graphs off: %s", reason)
            return
        self.runner.graphs = DecodeGraphs(self.runner, self.config.max_num_seqs, self.max_model_len)
        self.runner.graphs.capture()

    def close(self) -> None:
        """Release what the engine holds besides its memory: weight streaming's reader thread and buffers
        (reopened if the engine steps again). Requests in flight are aborted."""
        for rid in list(self.requests):
            self.abort(rid)
        if self.weight_streamer is not None:
            self.weight_streamer.close()
        if self.ranks is not None:
            self.ranks.shutdown()

    def moe_traffic(self) -> dict:
        """Expert parallelism: bytes sent between ranks so far, summed over them, per token per MoE layer
        (dispatch, combine, kv, reduce, head, meta, total; tessera.moe.token_flow.traffic_summary)."""
        if self.ranks is None or self.config.expert_parallel_size == 1:
            raise InvalidRequestError("moe_traffic counts expert-parallel traffic: it needs expert_parallel_size > 1")
        return self.ranks.moe_traffic(self.model)

    def _start_ranks(self, quant, layout) -> None:
        """Spawn the worker ranks (or join torchrun's) before loading, so that they load alongside."""
        if quant is not None or layout is not None:
            raise InvalidRequestError("quantized weights are not supported with tensor or sequence parallelism yet")
        from tessera.distributed.launch import start_ranks, threads_per_rank
        from tessera.distributed.tensor_parallel import HeadSplit

        if self.config.tensor_parallel_size > 1:  # a shape that does not split fails before anything starts
            HeadSplit.of(self.model_config, 0, self.config.tensor_parallel_size)
        if self.config.expert_parallel_size > 1:  # likewise a model without experts or a bad placement file
            from tessera.distributed.expert_parallel import engine_placement

            engine_placement(self.config, self.model_config)
        self.ranks = start_ranks(self.config, self.model_path, self.max_model_len, self.device.type)
        self.device = self.ranks.ctx.device
        if self.device.type == "cpu":
            torch.set_num_threads(threads_per_rank(self.config))

    # -- set-up ------------------------------------------------------------------------------
    def _check_moe_options(self, config, quant, layout) -> None:
        """Mixtures of experts (tessera/models/moe.py) run dense (fp32/bf16/fp16) and resident for now:
        the features built for dense MLPs say so instead of failing deep inside."""
        unsupported = [name for name, on in (("quantization", quant is not None or layout is not None),
                                             ("weight_memory", config.weight_memory is not None),
                                             ("enable_lora", config.enable_lora)) if on]
        if unsupported:
            raise InvalidRequestError(f"{self.model_config.architecture} is a mixture of experts; "
                                      f"{', '.join(unsupported)} not supported for it yet")
        if config.moe_dispatch != "allreduce" and self.device.type != "cpu":
            # Its exchanges were written and tested on gloo only; no GPU has run them (NCCL is unchecked).
            raise InvalidRequestError(f"moe_dispatch={config.moe_dispatch} runs on CPU ranks (gloo) only for now; "
                                      f"use moe_dispatch=allreduce on {self.device.type}")

    def _resolve_max_model_len(self) -> int:
        cfg = self.model_config
        limit = cfg.max_position_embeddings
        if cfg.sliding_window:  # tessera attends densely, so stay inside the window to remain exact
            limit = min(limit, cfg.sliding_window)
        want = self.config.max_model_len
        if want is None:
            return limit
        if want > limit:
            raise InvalidRequestError(f"max_model_len {want} exceeds the model's context length {limit}")
        return want

    def _gguf_source(self) -> Path:
        """The GGUF file `quantization="gguf"` reads its blocks from."""
        if self.config.model is None:
            from tessera.models.default_model import default_model_gguf

            return Path(default_model_gguf())
        path = Path(self.config.model).expanduser()
        if path.suffix.lower() != ".gguf":
            raise InvalidRequestError(f"quantization='gguf' needs a .gguf model file, got {self.config.model!r}")
        return path

    def _checkpoint_spec(self, layout, asked):
        """A quantized checkpoint carries its own quantization: a different one asked for is an error,
        not a silent requantization."""
        if self.config.quantization not in (None, layout.quantization) or (
                asked is not None and asked.method != "gguf" and layout.method != asked.method):
            raise InvalidRequestError(
                f"{self.model_path} is a quantized checkpoint ({layout.quantization}, {layout.method}); "
                f"leave quantization unset (got {self.config.quantization!r}, {self.config.quantization_method!r})")
        if self.config.quantize_lm_head and not layout.lm_head:
            raise InvalidRequestError(f"{self.model_path} was quantized without its LM head; quantize_lm_head needs "
                                      "a checkpoint made with it (tessera quantize --quantize-lm-head)")
        return layout.spec()

    def _num_kv_blocks(self) -> int:
        # self.model.cfg: under tensor parallelism, this rank's share of the KV heads
        per_block = ModelRunner.kv_bytes_per_block(self.model.cfg, self.config.block_size, self.dtype)
        budget = self.config.kv_cache_memory
        if budget is None:
            free = available_memory_bytes(self.device)
            budget = int(0.9 * free) if self.device.type == "cuda" else min(_CPU_DEFAULT_KV_BYTES, free // 4)
        elif budget <= 1:
            budget = int(budget * available_memory_bytes(self.device))
        useful = self.config.max_num_seqs * -(-self.max_model_len // self.config.block_size) + 1
        num_blocks = min(int(budget) // per_block, useful)
        if num_blocks < 2:
            raise OutOfKVCacheError(f"kv_cache_memory={budget} bytes holds no KV block "
                                    f"({per_block} bytes each); give it more memory")
        return num_blocks

    # -- requests ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: give prompts as token-id lists")
            check_text(prompt, "prompt")
            return prompt, list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, list | tuple):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            vocab = self.model_config.vocab_size
            for t in prompt:
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                    raise InvalidRequestError(f"token id {t!r} is outside the vocabulary [0, {vocab})")
            return None, list(prompt)
        raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Validates lengths; returns prompt + max_tokens capped at the context length."""
        n = len(prompt_ids)
        vocab = self.model_config.vocab_size
        bad = [t for t in params.stop_token_ids or () if t >= vocab]
        if bad:
            raise InvalidRequestError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab})")
        TokenConstraints.build(params, self.tokenizer, vocab)  # logit_bias / allowed_token_ids ids in range
        if params.guided_decoding is not None:
            self.grammars.compile(params.guided_decoding)  # a bad schema/regex/grammar fails here, cached
        if n > self.max_model_len or (n == self.max_model_len and params.max_tokens != 0):
            raise PromptTooLongError(n, self.max_model_len,
                                     f"prompt has {n} tokens but the context length is {self.max_model_len} "
                                     f"(at least one token must be left to generate)")
        total = self.max_model_len if params.max_tokens is None else min(n + params.max_tokens, self.max_model_len)
        blocks = -(-total // self.config.block_size)
        if blocks > self.block_manager.num_blocks:
            raise OutOfKVCacheError(f"a request of {total} tokens needs {blocks} KV blocks but the pool has "
                                    f"{self.block_manager.num_blocks}; raise kv_cache_memory")
        return total

    def check_lora(self, lora_request) -> None:
        """Raise a TesseraError unless `lora_request` (a tessera.LoRARequest or None) can run here; loads
        the adapter into host memory the first time (so a bad adapter fails before any work starts)."""
        if lora_request is None:
            return
        from tessera.lora.request import LoRARequest

        if not isinstance(lora_request, LoRARequest):
            raise InvalidRequestError(f"lora_request must be a tessera.LoRARequest, got {type(lora_request).__name__}")
        if self.lora is None:
            raise InvalidRequestError(f"LoRA adapter {lora_request.lora_name!r} was asked for but LoRA is off; "
                                      f"start the engine with enable_lora=True (--enable-lora)")
        self.lora.register(lora_request)

    def variant(self, model: str | None):
        """The tessera.blockllm.Variant `model` names (None: the first; and None without several models)."""
        if self.variants is None:
            if model is not None:
                raise InvalidRequestError(f"model {model!r} was asked for but this engine runs one model; start it "
                                          f"with models={{name: path, ...}} (--models) to serve several")
            return None
        return self.variants.by_name(model)

    def add_request(self, prompt: str | list[int] | None, params: SamplingParams | None = None,
                    request_id: str | None = None, stream: bool = False,
                    prompt_token_ids: list[int] | None = None, lora_request=None, model: str | None = None) -> str:
        """With prompt_token_ids, `prompt` is only the text they came from (or None) and is not re-encoded.
        lora_request: a tessera.LoRARequest, the adapter the request runs with (None: the base model).
        model: with several models (EngineConfig.models), the one it runs on (None: the first)."""
        params = params or SamplingParams()
        params.validate()
        self.check_lora(lora_request)
        variant = self.variant(model)
        if prompt_token_ids is None:
            text, ids = self.encode_prompt(prompt)
        else:
            text, ids = (prompt if isinstance(prompt, str) else None), self.encode_prompt(prompt_token_ids)[1]
        total = self.check_request(ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._req_ids)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        constraints = TokenConstraints.build(params, self.tokenizer, self.model_config.vocab_size)
        # best_of of them when best_of > n; the best n are returned
        seqs = [self._new_seq(request_id, i, ids, params, total, constraints, lora_request,
                               variant)
                for i in range(params.num_sequences)]
        self.requests[request_id] = Request(request_id, text, ids, params, seqs, stream)
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def _new_seq(self, request_id: str, index: int, ids: list[int], params: SamplingParams, total: int,
                 constraints, lora_request, variant=None) -> Sequence:
        seq = Sequence(next(self._seq_ids), request_id, index, ids, params)
        stops = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stops.update(self.eos_token_ids)
        seq.stop_token_set = frozenset(stops)
        seq.constraints = constraints
        seq.max_total_tokens = total
        seq.lora_request = lora_request
        seq.variant = variant
        if params.seed is not None:
            # Completion i of a seeded request gets its own stream, derived from the seed.
            seq.generator = torch.Generator().manual_seed(  # on the CPU: see Sampler._draw
                (params.seed + index * 0x9E3779B97F4A7C15) % (1 << 64))
        if params.guided_decoding is not None:
            seq.guided = self.grammars.new_state(params.guided_decoding)  # one matcher per sequence
        self.output_processor.add(seq)
        return seq

    # -- moving requests between engines (tessera.engine.migration; used by tessera.fleet) ---------
    def export_request(self, request_id: str, with_kv: bool = True) -> SeqState:
        """The state of a running one-sequence request, with the K/V of its computed tokens."""
        req = self.requests.get(request_id)
        if req is None:
            raise InvalidRequestError(f"no request {request_id!r} in this engine")
        p = req.params
        if (len(req.seqs) != 1 or req.seqs[0].lora_request is not None or req.seqs[0].sparse is not None
                or p.prompt_logprobs is not None or p.prompt_entropies):
            raise InvalidRequestError(f"request {request_id!r} cannot move: only one-sequence base-model "
                                      "requests do (n == 1, no best_of, no LoRA, no sparse decode, no prompt "
                                      "logprobs or entropies)")
        seq = req.seqs[0]
        kv = read_kv(self.runner.kv_cache, seq.block_table, 0, seq.num_computed_tokens) if with_kv else None
        return SeqState(request_id, req.prompt, list(seq.prompt_token_ids), list(seq.output_token_ids), req.params,
                        list(seq.logprobs), seq.cumulative_logprob,
                        seq.generator.get_state() if seq.generator is not None else None, kv,
                        req.arrival_time, req.first_token_time)

    def detach_request(self, request_id: str, keep_kv: bool = False) -> KVCopy | None:
        """Take a request out of this engine without finishing it (it goes on elsewhere); with keep_kv
        its blocks stay here as a KVCopy (the caller owns them), else they go back to the pool."""
        req = self.requests.pop(request_id)
        seq = req.seqs[0]
        copy = None
        if keep_kv:
            copy = KVCopy(request_id, list(seq.token_ids), seq.block_table, seq.num_computed_tokens)
            seq.block_table = []  # now the copy's: free_seq below must not release them
        self.scheduler.finish(seq, "abort")
        return copy

    def adopt_request(self, state: SeqState, copy: KVCopy | None = None, stream: bool = True) -> str:
        """Go on with a request another engine started: its output so far is replayed through the output
        processor (text, stop strings, grammar), then it runs from the K/V it brings (state.kv), or the
        blocks of `copy` (taken over, no copy made), or, with neither, from a recompute of its tokens."""
        rid, params = state.request_id, state.params
        if rid in self.requests:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        ids = state.prompt_token_ids
        total = self.check_request(ids, params)
        seq = self._new_seq(rid, 0, ids, params, total, TokenConstraints.build(params, self.tokenizer,
                                                                               self.model_config.vocab_size), None)
        for tok in state.output_token_ids:
            if seq.guided is not None:
                seq.guided.accept(tok)
            self.output_processor.append(seq, tok)
        seq.logprobs, seq.cumulative_logprob = list(state.logprobs), state.cumulative_logprob
        if state.generator_state is not None:
            seq.generator.set_state(state.generator_state)
        limit = seq.num_tokens - 1  # at least one token is computed here, so the next step samples
        if copy is not None and copy.token_ids[:copy.num_rows] == seq.token_ids[:copy.num_rows]:
            seq.block_table, seq.num_computed_tokens = copy.block_table, min(copy.num_rows, limit)
            copy.block_table = []
        elif state.kv is not None and state.num_kv:
            n = min(state.num_kv, limit)
            need = -(-n // self.block_manager.block_size)
            if need <= self.block_manager.num_free_blocks:  # else: recomputed, like after a preemption
                seq.block_table = self.block_manager.take_blocks(need)
                write_kv(self.runner.kv_cache, seq.block_table, 0, state.kv[:, :, :n])
                seq.num_computed_tokens = n
        req = Request(rid, state.prompt, list(ids), params, [seq], stream)
        if state.arrival_time is not None:
            req.arrival_time, req.first_token_time = state.arrival_time, state.first_token_time
        self.requests[rid] = req
        self.scheduler.adopt(seq)
        return rid

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.output_processor.abort(seq)
                self.scheduler.finish(seq, "abort")
        req.finish_time = time.monotonic()
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration. Returns outputs of finished requests and of streaming ones that moved."""
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        touched: dict[str, Request] = {}
        if self.lora is not None:
            failed = self.lora.activate(self.scheduler.running)  # every running adapter in a slot
            if failed:
                plan.scheduled = self._fail_adapters(plan.scheduled, failed, touched)
        logits = self.runner.run(plan.scheduled) if plan.scheduled else None
        sampling = [item for item in plan.scheduled if item.samples]
        for item in plan.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            self.stats["prompt_tokens"] += max(0, min(start + item.num_new_tokens, seq.num_prompt_tokens) - start)
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit(seq)
            if seq.params.max_tokens == 0 and seq.num_computed_tokens == seq.num_tokens:
                # Only its prompt was to be scored (max_tokens=0): done after the prefill, nothing sampled.
                self.scheduler.finish(seq, "length")
                touched[seq.request_id] = self.requests[seq.request_id]
        self.stats["steps"] += 1
        if sampling:
            seqs = [item.seq for item in sampling]
            result = self.sampler(logits, seqs)
            now = time.monotonic()
            self.stats["generation_tokens"] += len(seqs)
            for k, seq in enumerate(seqs):
                self._append_token(seq, result.token_ids[k], result.logprobs[k], result.token_logprobs[k])
                req = self.requests[seq.request_id]
                if req.first_token_time is None:
                    req.first_token_time = now
                touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            if req.finished:
                req.finish_time = time.monotonic()
                del self.requests[req.request_id]
                outputs.append(self._output(req))
            elif req.stream and req.params.num_sequences == req.params.n:  # best_of picks only at the end
                outputs.append(self._output(req))
        return outputs

    def _fail_adapters(self, scheduled: list, failed: dict, touched: dict[str, Request]) -> list:
        """Finish with "error" every running sequence whose adapter could not be put in a slot (its
        blocks go back to the pool) and return the rest of the step, which runs as planned."""
        for seq in [s for s in self.scheduler.running if s.lora_int_id in failed]:
            req = self.requests[seq.request_id]
            req.error = f"Loading LoRA adapter {seq.lora_request.lora_name!r} failed: {failed[seq.lora_int_id]}"
            req.error_cause = failed[seq.lora_int_id]
            self.output_processor.abort(seq)
            self.scheduler.finish(seq, "error")
            touched[req.request_id] = req
        return [item for item in scheduled if not item.seq.is_finished]

    def _append_token(self, seq: Sequence, token: int, logprobs, token_logprob) -> None:
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        if token_logprob is not None:  # asked for logprobs, or best_of ranks by it
            seq.cumulative_logprob += token_logprob
        guided = seq.guided
        if guided is not None and not guided.accept(token):
            # The grammar mask forbade this token, so this is a bug and not bad input: end the sequence
            # before it leaves its grammar rather than return text that breaks the constraint.
            log.error("request %s: sampled token %d outside its grammar; aborting it", seq.request_id, token)
            self.output_processor.abort(seq)
            self.scheduler.finish(seq, "abort")
            return
        reason = self.output_processor.append(seq, token)
        if reason is None and guided is not None and guided.terminated:
            reason = "stop"  # the grammar accepted its end (a stop token even with ignore_eos)
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def set_sparse(self, request_id: str, config) -> None:
        """Decode this request with sparse KV retrieval (a tessera.longctx.SparseConfig)."""
        if self.ranks is not None:
            raise InvalidRequestError("sparse KV retrieval is not supported with tensor or sequence parallelism yet")
        for seq in self.requests[request_id].seqs:
            seq.sparse = config

    @property
    def sparse_stats(self) -> dict:
        kv = self.runner.sparse_kv
        return kv.stats.as_dict() if kv is not None else {}

    @staticmethod
    def _returned_seqs(req: Request) -> list[Sequence]:
        """The sequences a request returns: all n, or with best_of > n (vLLM) the n with the highest
        cumulative logprob, best first (their indices become 0..n-1, as OpenAI's choices)."""
        p = req.params
        if p.num_sequences == p.n:
            return req.seqs
        return sorted(req.seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: p.n]

    def _output(self, req: Request) -> RequestOutput:
        outs = [CompletionOutput(i, self.output_processor.text(s), s.output_token_ids, s.finish_reason,
                                 s.stop_reason, s.logprobs if req.params.logprobs is not None else None,
                                 s.cumulative_logprob if req.params.logprobs is not None else None)
                for i, s in enumerate(self._returned_seqs(req))]
        metrics = {"arrival_time": req.arrival_time, "first_token_time": req.first_token_time,
                   "finish_time": req.finish_time,
                   "num_cached_tokens": max(s.num_cached_prompt_tokens for s in req.seqs),
                   "num_preemptions": sum(s.num_preemptions for s in req.seqs)}
        entropies = req.seqs[0].prompt_entropies if req.params.prompt_entropies else None
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished, error=req.error,
                             error_cause=req.error_cause,
                             metrics=metrics, prompt_entropies=list(entropies) if entropies is not None else None,
                             prompt_logprobs=self._prompt_logprobs(req))

    def _prompt_logprobs(self, req: Request) -> list[dict[int, Logprob] | None] | None:
        """vLLM's shape: None for the first prompt token, then each token's entry, with decoded_token
        filled in (once, when the last entry is in)."""
        if req.params.prompt_logprobs is None:
            return None
        entries = req.seqs[0].prompt_logprobs
        if self.tokenizer is not None and not req.prompt_logprobs_decoded and all(e is not None for e in entries):
            lps = [lp for entry in entries for lp in entry.values()]
            for lp, text in zip(lps, self.tokenizer.batch_decode([[lp.token_id] for lp in lps]), strict=True):
                lp.decoded_token = text
            req.prompt_logprobs_decoded = True
        return [None, *entries]
