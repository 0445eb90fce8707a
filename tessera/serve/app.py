"""The OpenAI-compatible HTTP server: FastAPI routes over an AsyncEngine, run by uvicorn.

Every request is validated here, before it reaches the engine thread: prompts are tokenized, lengths
checked against the context (vLLM's message), sampling parameters built; anything wrong is a 400 with
OpenAI's error JSON. Streams are server-sent events ending in `data: [DONE]`; a client that goes
away (mid-stream, or while a non-streamed request runs) gets its request aborted, which frees its KV
blocks at the engine's next turn. SIGTERM drains: new requests get 503, open ones may finish within
`--shutdown-grace` seconds, the rest are aborted (finish_reason "abort"), then uvicorn exits (launch.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessera.errors import InvalidRequestError, OutOfKVCacheError, TesseraError
from tessera.guided_params import GuidedDecodingParams
from tessera.outputs import RequestOutput
from tessera.sampling_params import SamplingParams
from tessera.serve.async_engine import AsyncEngine, QueueFullError, RequestHandle, ShuttingDownError
from tessera.serve.auth import APIKeyMiddleware
from tessera.serve.errors import APIError, error_response, param_of, validation_message
from tessera.serve.metrics import ServerMetrics
from tessera.serve.prompt_logprobs import (
    check_prompt_logprobs,
    check_zero_max_tokens,
    completion_choice_prompt_logprobs,
    completion_prompt_logprobs,
    echo_logprobs,
    vllm_prompt_logprobs,
)
from tessera.serve.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    UsageInfo,
    random_id,
)
from tessera.serve.sse import (
    ChoiceState,
    sse_engine_error,
    sse_event,
    streaming_response,
    text_delta,
    wait_disconnect,
)
from tessera.serve.structured import guided_from_request
from tessera.serve.tokenize_routes import add_tokenize_routes
from tessera.serve.tokenizer_info import add_tokenizer_info_route
from tessera.serve.tools import ToolPlan, plan_tools, tool_message, tool_stream_delta
from tessera.tokenizer import apply_chat_template, token_bytes

log = logging.getLogger("tessera.serve")

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


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


@dataclass
class _Prompt:
    text: str | None
    ids: list[int]


@dataclass
class _Batch:
    """The engine requests behind one HTTP request (one per prompt), sharing one output queue."""

    engine: AsyncEngine
    metrics: ServerMetrics
    arrival: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    handles: list[RequestHandle] = field(default_factory=list)
    remaining: int = 0

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
    def __init__(self, engine: AsyncEngine, model_name: str | list[str], chat_template: str | None = None,
                 tool_call_parser: str | None = None):
        self.engine = engine
        self.tool_call_parser = tool_call_parser  # --tool-call-parser: reads tool calls for tool_choice "auto"
        self.llm = engine.engine
        # --served-model-name: a request may name any of them; responses carry the first
        self.served_model_names = [model_name] if isinstance(model_name, str) else list(model_name)
        self.model_name = self.served_model_names[0]
        self.chat_template = chat_template  # --chat-template, else the tokenizer's
        self.defaults = self.llm.generation_defaults  # generation_config.json's, for fields a request leaves unset
        self.tokenizer = self.llm.tokenizer
        self.max_model_len = self.llm.max_model_len
        self.metrics = ServerMetrics(engine, self.model_name)
        self._tokens: dict[int, tuple[str, bytes]] = {}

    # -- validation ----------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise APIError(
                404,
                f"The model `{model}` does not exist. This server serves "
                + ", ".join(f"`{n}`" for n in self.served_model_names) + ".",
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

    def sampling_params(self, req, prompt: _Prompt, max_tokens: int, logprobs: int | None,
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

    def encode_prompts(self, prompt) -> list[_Prompt]:
        items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not items:
            raise APIError(400, "prompt is empty", param="prompt")
        out = []
        for item in items:
            try:
                text, ids = self.llm.encode_prompt(item)
            except InvalidRequestError as e:
                raise APIError(400, str(e), param="prompt") from e
            out.append(_Prompt(text, ids))
        return out

    def encode_chat(self, req: ChatCompletionRequest, tools: list[dict] | None = None) -> _Prompt:
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
        return _Prompt(None, ids)

    # -- running -------------------------------------------------------------------------------
    async def submit(
        self, request_id: str, prompts: list[_Prompt], params: list[SamplingParams], arrival: float, stream: bool
    ) -> _Batch:
        self.check_accepting(len(prompts))
        batch = _Batch(self.engine, self.metrics, arrival)
        try:
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                batch.handles.append(await self.engine.add(rid, p.text, p.ids, sp, batch.queue, tag=i, stream=stream))
                batch.remaining += 1
        except BaseException as e:
            batch.abort_unfinished()
            if isinstance(e, ShuttingDownError):
                raise APIError(503, str(e), "service_unavailable", code="shutting_down") from e
            if isinstance(e, QueueFullError):
                raise APIError(429, str(e), "rate_limit_error", code="queue_full") from e
            if isinstance(e, InvalidRequestError | OutOfKVCacheError):
                raise APIError(400, str(e), param=param_of(e)) from e
            raise
        return batch

    async def collect(self, batch: _Batch, raw: Request) -> list[RequestOutput] | None:
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

    def prompt_text(self, p: _Prompt) -> str:
        if p.text is not None:
            return p.text
        return self.tokenizer.decode(p.ids) if self.tokenizer is not None else ""

    def token(self, tid: int) -> tuple[str, bytes]:
        """A token's text alone (U+FFFD where it is only part of a character) and its own UTF-8 bytes."""
        got = self._tokens.get(tid)
        if got is None:
            if self.tokenizer is None:
                s = f"token_id:{tid}"
                got = (s, s.encode())
            else:
                got = (self.tokenizer.decode([tid]), token_bytes(self.tokenizer, tid))
            if len(self._tokens) < 1 << 18:
                self._tokens[tid] = got
        return got

    def token_str(self, tid: int) -> str:
        return self.token(tid)[0]

    def completion_logprobs(self, token_ids: list[int], lps: list[dict], st: ChoiceState) -> dict:
        """Legacy completions logprobs; st.text_offset (characters) moves on by the text of the tokens'
        bytes, so a character split over tokens counts once and every offset indexes the text."""
        res = CompletionLogprobs()
        for tid, entry in zip(token_ids, lps, strict=False):
            s, raw = self.token(tid)
            lp = entry.get(tid) if entry is not None else None  # None: an echoed prompt's first token
            res.tokens.append(s)
            res.token_logprobs.append(_finite(lp.logprob) if lp is not None else None)
            res.top_logprobs.append(
                None if entry is None else
                {self.token_str(t): _finite(v.logprob) for t, v in sorted(entry.items(), key=lambda kv: kv[1].rank)}
            )
            res.text_offset.append(st.text_offset)
            st.text_offset += len(st.utf8.decode(raw))
        return res.model_dump()

    def chat_logprobs(self, token_ids: list[int], lps: list[dict], k: int) -> dict:
        content = []
        for tid, entry in zip(token_ids, lps, strict=False):
            s, raw = self.token(tid)
            lp = entry.get(tid)
            tops = sorted((v for v in entry.values() if v.rank <= k), key=lambda v: v.rank)[:k]
            content.append(
                ChatTokenLogprob(
                    token=s,
                    logprob=_finite(lp.logprob) if lp is not None else -9999.0,
                    bytes=list(raw),
                    top_logprobs=[
                        TopLogprob(
                            token=self.token_str(v.token_id),
                            logprob=_finite(v.logprob),
                            bytes=list(self.token(v.token_id)[1]),
                        )
                        for v in tops
                    ],
                )
            )
        return ChatLogprobs(content=content).model_dump()

    @staticmethod
    def usage(prompts: list[_Prompt], finals: list[RequestOutput]) -> dict:
        p = sum(len(x.ids) for x in prompts)
        c = sum(len(o.token_ids) for f in finals for o in f.outputs)
        return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c).model_dump()

    @staticmethod
    def raise_if_failed(finals: list[RequestOutput]) -> None:
        for f in finals:
            if f.error or any(o.finish_reason == "error" for o in f.outputs) or not f.outputs:
                raise APIError(500, f.error or "the engine failed this request", "internal_error", code=500)

    # -- /v1/completions -------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        self.check_model(req.model)
        self.check_accepting()
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of > MAX_N:
            raise APIError(400, f"best_of must be at most {MAX_N}, got {req.best_of}", param="best_of")
        if req.stream and req.best_of is not None and req.best_of > req.n:
            raise APIError(400, "best_of > n cannot be streamed: the best n are known only when all best_of "
                           "sequences have finished", param="best_of")
        check_prompt_logprobs(req)
        check_zero_max_tokens(req)
        prompts = self.encode_prompts(req.prompt)
        guided = guided_from_request(req, self.llm.grammars)
        default_max = self.defaults.get("max_tokens", 16)  # the model's, else OpenAI's completions default
        params = [
            self.sampling_params(
                req, p, self.resolve_max_tokens(len(p.ids), req.max_tokens, "prompt", default_max), req.logprobs,
                completion_prompt_logprobs(req), guided,
            )
            for p in prompts
        ]
        rid = random_id("cmpl")
        batch = await self.submit(rid, prompts, params, arrival, req.stream)
        created = int(time.time())
        echo = [self.prompt_text(p) if req.echo else "" for p in prompts]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return streaming_response(
                self.stream_completion(batch, rid, created, prompts, params, echo, include_usage, req.echo)
            )
        finals = await self.collect(batch, raw)
        if finals is None:
            return Response(status_code=499)
        self.raise_if_failed(finals)
        choices = []
        for i, f in enumerate(finals):
            for o in f.outputs:
                lp = None
                if req.logprobs is not None and o.logprobs is not None:
                    ids, lps = echo_logprobs(req.echo, prompts[i].ids, f, o.token_ids, o.logprobs)
                    lp = self.completion_logprobs(ids, lps, ChoiceState(text_offset=0 if req.echo else len(echo[i])))
                choices.append(
                    CompletionChoice(
                        index=i * req.n + o.index,
                        text=echo[i] + o.text,
                        logprobs=lp,
                        finish_reason=o.finish_reason,
                        stop_reason=o.stop_reason,
                        prompt_logprobs=completion_choice_prompt_logprobs(req, f),
                    )
                )
        resp = CompletionResponse(
            id=rid, created=created, model=self.model_name, choices=choices, usage=self.usage(prompts, finals)
        )
        return JSONResponse(resp.model_dump())

    async def stream_completion(
        self, batch: _Batch, rid: str, created: int, prompts, params, echo, include_usage: bool, echoes: bool = False
    ):
        n = params[0].n
        states: dict[int, ChoiceState] = {}
        finals: list[RequestOutput] = []
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        try:
            while batch.remaining:
                tag, out = await batch.next()
                if out.finished:
                    finals.append(out)
                for o in out.outputs:
                    idx = tag * n + o.index
                    st = states.setdefault(idx, ChoiceState(text_offset=0 if echoes else len(echo[tag])))
                    first = st.sent_text == 0
                    delta, fin = text_delta(st, o)
                    if delta is None:
                        continue
                    if first:  # the first chunk carries the echo
                        delta = echo[tag] + delta
                    lp = None
                    if params[tag].logprobs is not None and o.logprobs is not None:
                        ids, lps = o.token_ids[st.sent_tokens :], o.logprobs[st.sent_tokens :]
                        if first:
                            ids, lps = echo_logprobs(echoes, prompts[tag].ids, out, ids, lps)
                        lp = self.completion_logprobs(ids, lps, st)
                    st.sent_tokens = len(o.token_ids)
                    chunk = {
                        **base,
                        "choices": [
                            {
                                "index": idx,
                                "text": delta,
                                "logprobs": lp,
                                "finish_reason": fin,
                                "stop_reason": o.stop_reason if fin else None,
                            }
                        ],
                    }
                    if include_usage:
                        chunk["usage"] = None
                    yield sse_event(chunk)
                if out.finished and (out.error or not out.outputs):
                    yield sse_engine_error(out)
            if include_usage:
                yield sse_event({**base, "choices": [], "usage": self.usage(prompts, finals)})
            yield "data: [DONE]\n\n"
        finally:
            batch.abort_unfinished()

    # -- /v1/chat/completions --------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        self.check_model(req.model)
        self.check_accepting()
        plan = plan_tools(req.tools, req.tool_choice, self.tool_call_parser, req.parallel_tool_calls)
        guided = guided_from_request(req, self.llm.grammars)
        tool_guided = plan.compiled_guided(self.llm.grammars)  # tool_choice required / named
        if tool_guided is not None and guided is not None:
            raise APIError(400, f"tool_choice {json.dumps(req.tool_choice)} constrains the output already; "
                                "drop response_format / the guided fields", param="tool_choice")
        guided = guided or tool_guided
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        prompt = self.encode_chat(req, plan.tools)
        want = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        k = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = self.resolve_max_tokens(len(prompt.ids), want, "messages", self.defaults.get("max_tokens"))
        check_prompt_logprobs(req)
        params = self.sampling_params(req, prompt, max_tokens, k, req.prompt_logprobs, guided)
        rid = random_id("chatcmpl")
        batch = await self.submit(rid, [prompt], [params], arrival, req.stream)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return streaming_response(self.stream_chat(batch, rid, created, prompt, params, include_usage, plan))
        finals = await self.collect(batch, raw)
        if finals is None:
            return Response(status_code=499)
        self.raise_if_failed(finals)
        choices = [
            ChatChoice(
                index=o.index,
                message=message,
                logprobs=self.chat_logprobs(o.token_ids, o.logprobs, k)
                if k is not None and o.logprobs is not None
                else None,
                finish_reason=finish_reason,
                stop_reason=o.stop_reason,
            )
            for o in finals[0].outputs
            for message, finish_reason in [tool_message(plan, o)]
        ]
        resp = ChatCompletionResponse(
            id=rid, created=created, model=self.model_name, choices=choices, usage=self.usage([prompt], finals),
            prompt_logprobs=vllm_prompt_logprobs(finals[0].prompt_logprobs),
        )
        return JSONResponse(resp.model_dump())

    async def stream_chat(
        self, batch: _Batch, rid: str, created: int, prompt: _Prompt, params: SamplingParams, include_usage: bool,
        plan: ToolPlan | None = None,
    ):
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        extra = {"usage": None} if include_usage else {}
        states = {i: ChoiceState() for i in range(params.n)}
        tool_streams = {i: plan.streamer() for i in range(params.n)} if plan is not None and plan.calls_tools else {}
        finals: list[RequestOutput] = []
        try:
            for i in range(params.n):
                yield sse_event(
                    {
                        **base,
                        "choices": [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                        **extra,
                    }
                )
            while batch.remaining:
                _, out = await batch.next()
                if out.finished:
                    finals.append(out)
                for o in out.outputs:
                    st = states[o.index]
                    delta, fin = text_delta(st, o)
                    if delta is None:
                        continue
                    message = {"content": delta} if delta or not fin else {}
                    if tool_streams:  # text inside a tool call is held until the call is whole
                        message, fin = tool_stream_delta(tool_streams[o.index], delta, fin)
                        if message is None:
                            continue
                    lp = None
                    if params.logprobs is not None and o.logprobs is not None:
                        lp = self.chat_logprobs(
                            o.token_ids[st.sent_tokens :], o.logprobs[st.sent_tokens :], params.logprobs
                        )
                    st.sent_tokens = len(o.token_ids)
                    choice = {
                        "index": o.index,
                        "delta": message,
                        "logprobs": lp,
                        "finish_reason": fin,
                    }
                    if fin:
                        choice["stop_reason"] = o.stop_reason
                    yield sse_event({**base, "choices": [choice], **extra})
                if out.finished and (out.error or not out.outputs):
                    yield sse_engine_error(out)
            if include_usage:
                yield sse_event({**base, "choices": [], "usage": self.usage([prompt], finals)})
            yield "data: [DONE]\n\n"
        finally:
            batch.abort_unfinished()


def note_ignored_fields(req, response: Response) -> Response:
    """Harmless OpenAI fields tessera does not act on (protocol.IGNORED_REQUEST_FIELDS): logged, and
    named in an HTTP Warning header, so that the client can tell they did nothing."""
    ignored = getattr(req, "_ignored_fields", None)
    if ignored:
        log.warning("ignored request field(s) tessera does not act on: %s", ", ".join(ignored))
        response.headers["warning"] = f'299 tessera "ignored fields: {", ".join(ignored)}"'
    return response


def build_app(engine: AsyncEngine, model_name: str | list[str], *, api_key: str | None = None,
              chat_template: str | None = None, tool_call_parser: str | None = None) -> FastAPI:
    """model_name: the served model name(s) (--served-model-name); api_key: --api-key (None: open);
    chat_template: --chat-template's text (None: the tokenizer's)."""
    server = OpenAIServer(engine, model_name, chat_template=chat_template, tool_call_parser=tool_call_parser)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="tessera", lifespan=lifespan)
    app.state.server = server
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        server.metrics.error(exc.status)
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        server.metrics.error(400)
        message, param = validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(
            exc.status_code,
            str(exc.detail),
            "not_found_error" if exc.status_code == 404 else "invalid_request_error",
            code=exc.status_code,
        )

    @app.exception_handler(TesseraError)
    async def _tessera_error(request: Request, exc: TesseraError):
        server.metrics.error(400)
        return error_response(400, str(exc), param=param_of(exc))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        server.metrics.error(500)
        return error_response(500, f"internal server error: {type(exc).__name__}", "internal_error", code=500)

    @app.get("/health")
    async def health():
        if engine.draining or not engine.alive:
            return error_response(
                503, "shutting down" if engine.draining else "the engine loop is not running", "service_unavailable"
            )
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        root = str(engine.engine.model_path)
        cards = [ModelCard(id=n, root=root, max_model_len=server.max_model_len) for n in server.served_model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return note_ignored_fields(req, await server.completions(req, raw))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        return note_ignored_fields(req, await server.chat(req, raw))

    add_tokenize_routes(app, server)
    add_tokenizer_info_route(app, server)
    return app
