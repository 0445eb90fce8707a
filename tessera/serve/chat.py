"""/v1/chat/completions: messages rendered by the chat template, n choices out, whole or streamed.

Tools (tools.py) either constrain the output (tool_choice required / named) or are read from the text
by --tool-call-parser (auto); a stream holds back text inside a tool call until the call is whole."""

from __future__ import annotations

import json
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tessera.outputs import RequestOutput
from tessera.sampling_params import SamplingParams
from tessera.serve.errors import APIError
from tessera.serve.prompt_logprobs import check_prompt_logprobs, vllm_prompt_logprobs
from tessera.serve.protocol import ChatChoice, ChatCompletionRequest, ChatCompletionResponse, random_id
from tessera.serve.serving import Batch, OpenAIServer, Prompt
from tessera.serve.sse import ChoiceState, sse_engine_error, sse_event, streaming_response, text_delta
from tessera.serve.structured import guided_from_request
from tessera.serve.tools import ToolPlan, plan_tools, tool_message, tool_stream_delta


async def create_chat_completion(server: OpenAIServer, req: ChatCompletionRequest, raw: Request) -> Response:
    arrival = time.monotonic()
    lora = server.check_model(req.model)
    server.check_accepting()
    plan = plan_tools(req.tools, req.tool_choice, server.tool_call_parser, req.parallel_tool_calls)
    guided = guided_from_request(req, server.llm.grammars)
    tool_guided = plan.compiled_guided(server.llm.grammars)  # tool_choice required / named
    if tool_guided is not None and guided is not None:
        raise APIError(400, f"tool_choice {json.dumps(req.tool_choice)} constrains the output already; "
                            "drop response_format / the guided fields", param="tool_choice")
    guided = guided or tool_guided
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    prompt = server.encode_chat(req, plan.tools)
    want = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    k = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = server.resolve_max_tokens(len(prompt.ids), want, "messages", server.defaults.get("max_tokens"))
    check_prompt_logprobs(req)
    params = server.sampling_params(req, prompt, max_tokens, k, req.prompt_logprobs, guided)
    rid = random_id("chatcmpl")
    batch = await server.submit(rid, [prompt], [params], arrival, req.stream, lora, model=req.model)
    created = int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return streaming_response(stream_chat(server, batch, rid, created, prompt, params, include_usage, plan))
    finals = await server.collect(batch, raw)
    if finals is None:
        return Response(status_code=499)
    server.raise_if_failed(finals)
    choices = [
        ChatChoice(
            index=o.index,
            message=message,
            logprobs=server.logprob_format.chat_logprobs(o.token_ids, o.logprobs, k)
            if k is not None and o.logprobs is not None
            else None,
            finish_reason=finish_reason,
            stop_reason=o.stop_reason,
        )
        for o in finals[0].outputs
        for message, finish_reason in [tool_message(plan, o)]
    ]
    resp = ChatCompletionResponse(
        id=rid, created=created, model=batch.model, choices=choices, usage=server.usage([prompt], finals),
        prompt_logprobs=vllm_prompt_logprobs(finals[0].prompt_logprobs),
    )
    return JSONResponse(resp.model_dump())


async def stream_chat(
    server: OpenAIServer, batch: Batch, rid: str, created: int, prompt: Prompt, params: SamplingParams,
    include_usage: bool, plan: ToolPlan | None = None,
):
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": batch.model}
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
                    lp = server.logprob_format.chat_logprobs(
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
            yield sse_event({**base, "choices": [], "usage": server.usage([prompt], finals)})
        yield "data: [DONE]\n\n"
    finally:
        batch.abort_unfinished()
