"""`LLM`: the offline, vLLM-shaped entry point."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq

from tqdm.auto import tqdm

from tessera.config import EngineConfig
from tessera.engine.llm_engine import LLMEngine
from tessera.engine.prefix_planner import PlannedAdmission, add_planned
from tessera.errors import InvalidRequestError, TesseraError
from tessera.longctx import SegmentConfig, SparseConfig, resolve_long_context, segments
from tessera.lora.request import LoRARequest
from tessera.outputs import RequestOutput
from tessera.sampling_params import SamplingParams
from tessera.tokenizer import apply_chat_template

Prompt = str | list[int]

log = logging.getLogger("tessera")


class LLM:
    """`LLM(model=None)` loads the default model (SmolLM2-135M-Instruct), fully offline."""

    def __init__(self, model: str | None = None, *, dtype: str = "auto", device: str = "auto",
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 mixed_prefill_tokens: int | None = None, prefill_first: bool = False,
                 kv_cache_memory: float | int | None = None, block_size: int = 16, enforce_eager: bool = False,
                 enable_prefix_caching: bool = True, prefix_planning: str = "auto",
                 max_model_len: int | None = None, seed: int = 0, num_threads: int | None = None,
                 generation_config: str = "auto", quantization: str | None = None,
                 quantization_group_size: int = 64, quantization_method: str = "rtn",
                 quantize_lm_head: bool = False, activation_bits: int | None = None, enable_lora: bool = False,
                 max_loras: int = 4,
                 max_lora_rank: int = 16, max_cpu_loras: int | None = None, weight_memory: int | str | None = None,
                 tensor_parallel_size: int = 1, sequence_parallel_size: int = 1,
                 sequence_parallel_mode: str = "tokenring", expert_parallel_size: int = 1,
                 moe_placement: str | None = None, moe_dispatch: str = "allreduce",
                 distributed_timeout_s: float = 300.0, models: dict[str, str] | None = None, progress: bool = True):
        """prefix_planning: "auto" plans every batch handed to generate/chat (shared prefixes computed
        once, decode-heavy requests first, admission by KV memory) when prefix caching is on; "on"
        plans even without the cache; "off" keeps plain FCFS in input order.

        mixed_prefill_tokens: the most prompt tokens a step that also carries running decodes computes
        (None: up to max_num_batched_tokens); a server's streams then wait at most that much prefill
        between two tokens. prefill_first: a step that can compute prompt tokens computes only those, and
        the running decodes take the next step (a first token waits for its prefill alone).

        enforce_eager: never capture CUDA graphs (on CUDA, decode-only steps otherwise replay a graph per
        batch-size bucket: tessera/engine/cuda_graphs.py).

        weight_memory: a resident weight budget (bytes, or "2GiB"); layers that do not fit stream from disk
        (tessera/offload).

        tensor_parallel_size / sequence_parallel_size: run on that many ranks (tessera/distributed); the
        engine starts the worker processes, or joins torchrun's ranks when launched by torchrun.
        expert_parallel_size: a mixture of experts' experts spread over that many ranks the same way, placed
        by `moe_placement` (a `tessera moe-place` JSON; default round-robin); `moe_dispatch` says how tokens
        meet their experts ("allreduce", "exflow" or "all-to-all"; tessera/moe/token_flow.py).

        models: several full fine-tunes of one architecture, {name: path} (then leave `model` unset: the
        first is loaded as the model); blocks identical across them are stored once and the requests of
        all of them batched together (tessera.blockllm). generate/chat's `model` picks one per prompt."""
        self.config = EngineConfig(model=model, dtype=dtype, device=device, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens,
                                   mixed_prefill_tokens=mixed_prefill_tokens, prefill_first=prefill_first,
                                   kv_cache_memory=kv_cache_memory,
                                   block_size=block_size, enforce_eager=enforce_eager,
                                   enable_prefix_caching=enable_prefix_caching,
                                   prefix_planning=prefix_planning, max_model_len=max_model_len, seed=seed,
                                   num_threads=num_threads, generation_config=generation_config,
                                   quantization=quantization, quantization_group_size=quantization_group_size,
                                   quantization_method=quantization_method, quantize_lm_head=quantize_lm_head,
                                   activation_bits=activation_bits,
                                   enable_lora=enable_lora, max_loras=max_loras, max_lora_rank=max_lora_rank,
                                   max_cpu_loras=max_cpu_loras, weight_memory=weight_memory,
                                   tensor_parallel_size=tensor_parallel_size,
                                   sequence_parallel_size=sequence_parallel_size,
                                   sequence_parallel_mode=sequence_parallel_mode,
                                   expert_parallel_size=expert_parallel_size, moe_placement=moe_placement,
                                   moe_dispatch=moe_dispatch,
                                   distributed_timeout_s=distributed_timeout_s, models=models)
        self.engine = LLMEngine(self.config, progress=progress)

    def close(self) -> None:
        """Stop weight streaming's reader thread and free its buffers (tessera/offload); reopened on next use."""
        self.engine.close()

    def moe_traffic(self) -> dict:
        """With expert_parallel_size > 1: the bytes moved between ranks so far, summed over the ranks, per
        token per MoE layer, by kind (dispatch, combine, kv, reduce, head, meta) and in total."""
        return self.engine.moe_traffic()

    @property
    def plans_batches(self) -> bool:
        mode = self.config.prefix_planning
        return mode == "on" or (mode == "auto" and self.engine.block_manager.enable_prefix_caching)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: SamplingParams with the model's generation_config.json values (generation_config="auto"),
        what generate and chat use when given no sampling params. A SamplingParams built by hand is
        never changed."""
        return SamplingParams(**self.engine.generation_defaults)

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, long_context=None,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
                 model: str | Seq[str | None] | None = None) -> list[RequestOutput]:
        """One output per prompt, in order. Every prompt is checked before any work starts: a bad one
        raises an InvalidRequestError that names its index, and nothing runs.

        lora_request: a LoRARequest for every prompt, or a list with one (or None: the base model) per
        prompt (vLLM's); needs enable_lora=True.

        model: with LLM(models=...), the model every prompt runs on, or a list with one per prompt
        (None: the first model).

        long_context: None; "segments" (or a SegmentConfig) for XL3M segment-wise inference on inputs
        longer than the window; "sparse" (or a SparseConfig) for sparse KV retrieval while decoding."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        loras = self._lora_list(lora_request, len(prompts))
        models = self._per_prompt(model, len(prompts), "model", str)
        lc = resolve_long_context(long_context)
        if isinstance(lc, SegmentConfig):
            if any(m is not None for m in models):
                raise InvalidRequestError("model= (several models) does not run with segment-wise long-context "
                                          "inference")
            if any(lr is not None for lr in loras):
                raise InvalidRequestError("LoRA adapters do not run with segment-wise long-context inference")
            return self._generate_segments(prompts, params, lc, use_tqdm,
                                           lambda p: segments.from_prompt(self.engine, p, lc))
        encoded = []
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            try:
                sp.validate()
                text, ids = self.engine.encode_prompt(p)
                self.engine.check_request(ids, sp)
                self.engine.check_lora(loras[i])
                self.engine.variant(models[i])
            except TesseraError as e:
                e.args = (f"prompt {i}: {e}",)  # name the offending prompt; nothing has run yet
                raise
            encoded.append((text, ids))
        return self._run([(t, ids, sp) for (t, ids), sp in zip(encoded, params, strict=True)], use_tqdm,
                         sparse=lc, loras=loras, models=models)

    def chat(self, messages, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None, long_context=None,
             tools: list[dict] | None = None,
             lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
             model: str | Seq[str | None] | None = None) -> list[RequestOutput]:
        """`messages`: one conversation (a list of role/content dicts) or a list of them. long_context as
        for generate; in segment mode the last user message holds the long input. tools: OpenAI function
        tools shown to the model (vLLM's; tessera.chat_tools renders them where the template does not)."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        tok = self.engine.tokenizer
        lc = resolve_long_context(long_context)
        if isinstance(lc, SegmentConfig):
            if lora_request is not None:
                raise InvalidRequestError("LoRA adapters do not run with segment-wise long-context inference")
            params = self._params_list(sampling_params, len(messages))
            return self._generate_segments(list(messages), params, lc, use_tqdm,
                                           lambda c: segments.from_chat(tok, c, lc, **(chat_template_kwargs or {})))
        prompts = []
        for i, conv in enumerate(messages):
            try:
                prompts.append(apply_chat_template(tok, conv, add_generation_prompt, tools=tools,
                                                   **(chat_template_kwargs or {})))
            except InvalidRequestError as e:
                raise InvalidRequestError(f"conversation {i}: {e}") from e
        return self.generate(prompts, sampling_params, use_tqdm, long_context=lc, lora_request=lora_request,
                             model=model)

    def _generate_segments(self, inputs: list, params: list[SamplingParams], cfg: SegmentConfig, use_tqdm: bool,
                           split) -> list[RequestOutput]:
        long_prompts = []
        for i, (x, sp) in enumerate(zip(inputs, params, strict=True)):
            try:
                sp.validate()
                long_prompts.append(split(x))
            except TesseraError as e:
                e.args = (f"prompt {i}: {e}",)
                raise
        return segments.generate_segments(self, long_prompts, params, cfg, use_tqdm)

    def _params_list(self, sp, n: int) -> list[SamplingParams]:
        if sp is None:
            return [self.get_default_sampling_params() for _ in range(n)]
        if isinstance(sp, SamplingParams):
            return [sp] * n
        sp = list(sp)
        if len(sp) != n:
            raise InvalidRequestError(f"got {len(sp)} sampling params for {n} prompts")
        return sp

    @staticmethod
    def _per_prompt(value, n: int, what: str, kind: type) -> list:
        """One value for every prompt, or a list with one per prompt -> a list of n."""
        if value is None or isinstance(value, kind):
            return [value] * n
        if not isinstance(value, list | tuple):
            raise InvalidRequestError(f"{what} must be a {kind.__name__} or a list of them, got {type(value).__name__}")
        if len(value) != n:
            raise InvalidRequestError(f"got {len(value)} {what} values for {n} prompts")
        return list(value)

    @staticmethod
    def _lora_list(lr, n: int) -> list[LoRARequest | None]:
        if lr is None or isinstance(lr, LoRARequest):
            return [lr] * n
        if isinstance(lr, str | bytes) or not isinstance(lr, Seq):
            raise InvalidRequestError(f"lora_request must be a LoRARequest or a list of them, got {type(lr).__name__}")
        lr = list(lr)
        if len(lr) != n:
            raise InvalidRequestError(f"got {len(lr)} LoRA requests for {n} prompts")
        return lr

    def _run(self, items, use_tqdm: bool, desc: str = "generating",
             sparse: SparseConfig | None = None, loras: list | None = None,
             models: list | None = None) -> list[RequestOutput]:
        engine = self.engine
        sched, bm = engine.scheduler, engine.block_manager
        fcfs = sched.policy
        hits0, queries0 = bm.prefix_hits, bm.prefix_queries
        ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(items), desc=desc, unit="req", disable=not use_tqdm, dynamic_ncols=True)
        t0, out_tokens = time.perf_counter(), 0
        try:
            if self.plans_batches and sum(sp.num_sequences for _, _, sp in items) > 1:
                # Request ids follow the input order even though requests enter in plan order.
                ids = [f"req-{next(engine._req_ids)}" for _ in items]
                sched.policy = PlannedAdmission()
                add_planned(engine, [(t, p, sp, rid) for (t, p, sp), rid in zip(items, ids, strict=True)],
                            sched.policy, loras, models)
            else:
                for k, (text, p, sp) in enumerate(items):
                    ids.append(engine.add_request(text, sp, prompt_token_ids=p,
                                                  lora_request=loras[k] if loras else None,
                                                  model=models[k] if models else None))
            if sparse is not None:
                for rid in ids:
                    engine.set_sparse(rid, sparse)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        bar.set_postfix(out_tok_s=f"{out_tokens / (time.perf_counter() - t0):.1f}")
        except BaseException:
            for rid in ids:  # never leave requests (and their KV blocks) behind
                engine.abort(rid)
            raise
        finally:
            bar.close()
            sched.policy = fcfs
        if bm.prefix_queries > queries0:
            hits, queries = bm.prefix_hits - hits0, bm.prefix_queries - queries0
            log.info("prefix cache: %.1f%% of %d prompt tokens found in the cache (overall %.1f%%)",
                     100 * hits / queries, queries, 100 * bm.prefix_hit_rate)
        return [results[r] for r in ids]
