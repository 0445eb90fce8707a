"""The request-independent core of the OpenAI-compatible server, over an AsyncEngine.

Every request is validated here, before it reaches the engine thread: prompts are tokenized, lengths
checked against the context (vLLM's message), sampling parameters built; anything wrong is an APIError
(a 400 with OpenAI's error JSON, app.py's handler). Admission turns a draining engine into 503 and a full
queue into 429. `submit` hands one HTTP request's prompts to the engine as one Batch; `collect` waits for
their final outputs and aborts them when the client goes away first, which frees their KV blocks at the
engine's next turn. The routes' handlers are completions.py and chat.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import Request

from tessera.errors import AdapterNotFoundError, InvalidRequestError, OutOfKVCacheError, TesseraError
from tessera.guided_params import GuidedDecodingParams
from tessera.outputs import RequestOutput
from tessera.sampling_params import SamplingParams
from tessera.serve.async_engine import AsyncEngine, QueueFullError, RequestHandle, ShuttingDownError
from tessera.serve.errors import APIError, engine_failure, param_of
from tessera.serve.logprob_format import LogprobFormatter
from tessera.serve.metrics import ServerMetrics
from tessera.serve.protocol import ChatCompletionRequest, UsageInfo
from tessera.serve.sse import wait_disconnect
from tessera.tokenizer import apply_chat_template

MAX_N = 128  # choices per prompt (OpenAI's own limit)
_CHAT_KWARGS_RESERVED = {
    "tokenize",
    "return_dict",
    "return_tensors",
    "add_generation_prompt",
    "conversation",
    "messages",
    "tools",
    "padding",
    "truncation",
    "max_length",
    "chat_template",  # the server's (--chat-template), not a request's
}


@dataclass
class Prompt:
    text: str | None
    ids: list[int]


@dataclass
class Batch:
    """The engine requests behind one HTTP request (one per prompt), sharing one output queue."""

    engine: AsyncEngine
    metrics: ServerMetrics
    arrival: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    handles: list[RequestHandle] = field(default_factory=list)
    remaining: int = 0
    model: str = ""  # the name responses carry: the served model's, or the LoRA adapter's (vLLM's)

    async def next(self) -> tuple[int, RequestOutput]:
        tag, out = await self.queue.get()
        if out.finished:
            self.remaining -= 1
            self.metrics.observe(self.arrival, out)
        return tag, out

    def abort_unfinished(self) -> None:
        for h in self.handles:
            if not h.finished:
                self.engine.abort(h.request_id)


class OpenAIServer:
    """One per app: the served model, its tokenizer and limits, and the checks and engine calls every
    route shares. Holds no request state; the route handlers take it as their first argument."""

    def __init__(self, engine: AsyncEngine, model_name: str | list[str], chat_template: str | None = None,
                 tool_call_parser: str | None = None, allow_runtime_lora_updating: bool = False):
        from tessera.serve.lora import ServedLoRAs

        self.engine = engine
        self.tool_call_parser = tool_call_parser  # --tool-call-parser: reads tool calls for tool_choice "auto"
        self.llm = engine.engine
        # --served-model-name: a request may name any of them; responses carry the first
        self.served_model_names = [model_name] if isinstance(model_name, str) else list(model_name)
        variants = engine.engine.variants
        if variants is not None:  # several models (--models): each served under its name, the first the default
            self.served_model_names = [v.name for v in variants.variants]
        self.model_name = self.served_model_names[0]
        self.chat_template = chat_template  # --chat-template, else the tokenizer's
        self.defaults = self.llm.generation_defaults  # generation_config.json's, for fields a request leaves unset
        self.tokenizer = self.llm.tokenizer
        self.max_model_len = self.llm.max_model_len
        self.metrics = ServerMetrics(engine, self.model_name)
        self.logprob_format = LogprobFormatter(self.tokenizer)  # tokens and logprobs as the APIs write them
        self.loras = ServedLoRAs(self, allow_runtime_lora_updating)  # adapters a request's `model` may name

    # -- validation ----------------------------------------------------------------------------
    def check_model(self, model: str | None):
        """The LoRARequest of the adapter `model` names (None: the base model); 404 for an unknown name."""
        if model is None or model in self.served_model_names:
            return None
        lora = self.loras.by_name.get(model)
        if lora is not None:
            return lora
        names = self.served_model_names + list(self.loras.by_name)
        raise APIError(
            404,
            f"The model `{model}` does not exist. This server serves " + ", ".join(f"`{n}`" for n in names) + ".",
            "not_found_error",
            param="model",
            code="model_not_found",
        )

    def check_accepting(self, num_requests: int = 1) -> None:
        try:
            self.engine.check_capacity(num_requests)
        except ShuttingDownError as e:
            raise APIError(503, str(e), "service_unavailable", code="shutting_down") from e
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from e

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None, where: str,
                           default: int | None = None) -> int | None:
        """max_tokens checked against the context; when the request gives none, `default` (capped at
        what the context leaves, as vLLM) or all the context leaves."""
        limit = self.max_model_len
        if prompt_len >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your request "
                f"has {prompt_len} input tokens. Please reduce the length of the input {where}.",
                param=where,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return limit - prompt_len if default is None else min(default, limit - prompt_len)
        if not isinstance(max_tokens, int) or max_tokens < 0:  # 0 only scores the prompt (SamplingParams checks)
            raise APIError(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}", param="max_tokens")
        if prompt_len + max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {where}, {max_tokens} in "
                f"the completion). Please reduce the length of the {where} or completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    def sampling_params(self, req, prompt: Prompt, max_tokens: int, logprobs: int | None,
                        prompt_logprobs: int | None = None,
                        guided: GuidedDecodingParams | None = None) -> SamplingParams:
        if req.n > MAX_N:
            raise APIError(400, f"n must be at most {MAX_N}, got {req.n}", param="n")
        vocab = self.llm.model_config.vocab_size
        if req.stop_token_ids and any(not 0 <= t < vocab for t in req.stop_token_ids):
            raise APIError(400, f"stop_token_ids must lie in [0, {vocab})", param="stop_token_ids")

        def unset(value, name: str, fallback):  # a field the request leaves unset: the model's default
            return self.defaults.get(name, fallback) if value is None else value

        top_k = unset(req.top_k, "top_k", -1)
        top_k = -1 if not top_k or top_k >= vocab else top_k  # top_k >= vocab is no filter at all
        try:
            params = SamplingParams(
                n=req.n,
                best_of=getattr(req, "best_of", None),
                temperature=unset(req.temperature, "temperature", 1.0),
                top_p=unset(req.top_p, "top_p", 1.0),
                top_k=top_k,
                min_p=unset(req.min_p, "min_p", 0.0),
                repetition_penalty=unset(req.repetition_penalty, "repetition_penalty", 1.0),
                logit_bias=req.logit_bias,
                allowed_token_ids=req.allowed_token_ids,
                bad_words=req.bad_words,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                include_stop_str_in_output=req.include_stop_str_in_output,
                seed=req.seed,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=req.skip_special_tokens,
                guided_decoding=guided,
            )
            self.llm.check_request(prompt.ids, params)  # the KV pool must hold one such request at all
        except (InvalidRequestError, OutOfKVCacheError) as e:
            raise APIError(400, str(e), param=param_of(e)) from e
        return params

    def encode_prompts(self, prompt) -> list[Prompt]:
        items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not items:
            raise APIError(400, "prompt is empty", param="prompt")
        out = []
        for item in items:
            try:
                text, ids = self.llm.encode_prompt(item)
            except InvalidRequestError as e:
                raise APIError(400, str(e), param="prompt") from e
            out.append(Prompt(text, ids))
        return out

    def encode_chat(self, req: ChatCompletionRequest, tools: list[dict] | None = None) -> Prompt:
        if not req.messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        messages = []
        for m in req.messages:
            content = m.content
            if content is None:
                content = ""
            elif isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(400, "only text content parts are supported", param="messages")
                    parts.append(part["text"])
                content = "\n".join(parts)
            msg = {"role": m.role, "content": content}
            if m.name is not None:
                msg["name"] = m.name
            if m.tool_calls:
                msg["tool_calls"] = m.tool_calls
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            messages.append(msg)
        kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items() if k not in _CHAT_KWARGS_RESERVED}
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        try:
            ids = apply_chat_template(self.tokenizer, messages, req.add_generation_prompt, tools=tools, **kwargs)
        except InvalidRequestError as e:
            raise APIError(400, str(e), param="messages") from e
        except Exception as e:  # a template that raises (e.g. roles must alternate) or bad kwargs
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from e
        if not ids or not all(isinstance(t, int) for t in ids):
            raise APIError(400, "the chat template produced no tokens", param="messages")
        return Prompt(None, ids)

    # -- running -------------------------------------------------------------------------------
    async def submit(
        self, request_id: str, prompts: list[Prompt], params: list[SamplingParams], arrival: float, stream: bool,
        lora=None, model: str | None = None,
    ) -> Batch:
        """lora: the LoRARequest check_model returned for the request's `model` (None: the base model).
        model: the request's `model`, which picks one of an engine's several models (--models)."""
        self.check_accepting(len(prompts))
        variant = model if lora is None and self.engine.engine.variants is not None else None
        batch = Batch(self.engine, self.metrics, arrival,
                      model=lora.lora_name if lora is not None else (variant or self.model_name))
        try:
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                batch.handles.append(await self.engine.add(rid, p.text, p.ids, sp, batch.queue, tag=i, stream=stream,
                                                           lora_request=lora, model=variant))
                batch.remaining += 1
        except BaseException as e:
            batch.abort_unfinished()
            if isinstance(e, ShuttingDownError):
                raise APIError(503, str(e), "service_unavailable", code="shutting_down") from e
            if isinstance(e, QueueFullError):
                raise APIError(429, str(e), "rate_limit_error", code="queue_full") from e
            if isinstance(e, InvalidRequestError | OutOfKVCacheError):
                raise APIError(400, str(e), param=param_of(e)) from e
            if isinstance(e, AdapterNotFoundError):  # its files are gone: vLLM's 404 "No adapter found"
                raise APIError(404, str(e), "not_found_error", param="model", code="lora_not_found") from e
            if isinstance(e, TesseraError):  # an adapter that can no longer be read
                raise APIError(400, str(e), param="model") from e
            raise
        return batch

    async def collect(self, batch: Batch, raw: Request) -> list[RequestOutput] | None:
        """All final outputs in prompt order, or None when the client went away first."""

        async def gather() -> list[RequestOutput]:
            finals: dict[int, RequestOutput] = {}
            while batch.remaining:
                tag, out = await batch.next()
                if out.finished:
                    finals[tag] = out
            return [finals[i] for i in range(len(batch.handles))]

        work = asyncio.ensure_future(gather())
        watch = asyncio.ensure_future(wait_disconnect(raw))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
            batch.abort_unfinished()
        return work.result() if work.done() and not work.cancelled() else None

    def prompt_text(self, p: Prompt) -> str:
        if p.text is not None:
            return p.text
        return self.tokenizer.decode(p.ids) if self.tokenizer is not None else ""

    @staticmethod
    def usage(prompts: list[Prompt], finals: list[RequestOutput]) -> dict:
        p = sum(len(x.ids) for x in prompts)
        c = sum(len(o.token_ids) for f in finals for o in f.outputs)
        return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c).model_dump()

    @staticmethod
    def raise_if_failed(finals: list[RequestOutput]) -> None:
        for f in finals:
            if f.error or any(o.finish_reason == "error" for o in f.outputs) or not f.outputs:
                raise engine_failure(f)
