"""/v1/completions: a prompt (or a batch of them) in, n choices per prompt out, whole or streamed.

echo puts the prompt before each choice's text (and its logprobs before the choice's, prompt_logprobs.py);
best_of > n keeps the n best and so cannot be streamed."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tessera.outputs import RequestOutput
from tessera.serve.errors import APIError
from tessera.serve.prompt_logprobs import (
    check_prompt_logprobs,
    check_zero_max_tokens,
    completion_choice_prompt_logprobs,
    completion_prompt_logprobs,
    echo_logprobs,
)
from tessera.serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse, random_id
from tessera.serve.serving import MAX_N, Batch, OpenAIServer
from tessera.serve.sse import ChoiceState, sse_engine_error, sse_event, streaming_response, text_delta
from tessera.serve.structured import guided_from_request


async def create_completion(server: OpenAIServer, req: CompletionRequest, raw: Request) -> Response:
    arrival = time.monotonic()
    lora = server.check_model(req.model)
    server.check_accepting()
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of > MAX_N:
        raise APIError(400, f"best_of must be at most {MAX_N}, got {req.best_of}", param="best_of")
    if req.stream and req.best_of is not None and req.best_of > req.n:
        raise APIError(400, "best_of > n cannot be streamed: the best n are known only when all best_of "
                       "sequences have finished", param="best_of")
    check_prompt_logprobs(req)
    check_zero_max_tokens(req)
    prompts = server.encode_prompts(req.prompt)
    guided = guided_from_request(req, server.llm.grammars)
    default_max = server.defaults.get("max_tokens", 16)  # the model's, else OpenAI's completions default
    params = [
        server.sampling_params(
            req, p, server.resolve_max_tokens(len(p.ids), req.max_tokens, "prompt", default_max), req.logprobs,
            completion_prompt_logprobs(req), guided,
        )
        for p in prompts
    ]
    rid = random_id("cmpl")
    batch = await server.submit(rid, prompts, params, arrival, req.stream, lora, model=req.model)
    created = int(time.time())
    echo = [server.prompt_text(p) if req.echo else "" for p in prompts]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return streaming_response(
            stream_completion(server, batch, rid, created, prompts, params, echo, include_usage, req.echo)
        )
    finals = await server.collect(batch, raw)
    if finals is None:
        return Response(status_code=499)
    server.raise_if_failed(finals)
    choices = []
    for i, f in enumerate(finals):
        for o in f.outputs:
            lp = None
            if req.logprobs is not None and o.logprobs is not None:
                ids, lps = echo_logprobs(req.echo, prompts[i].ids, f, o.token_ids, o.logprobs)
                st = ChoiceState(text_offset=0 if req.echo else len(echo[i]))
                lp = server.logprob_format.completion_logprobs(ids, lps, st)
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
        id=rid, created=created, model=batch.model, choices=choices, usage=server.usage(prompts, finals)
    )
    return JSONResponse(resp.model_dump())


async def stream_completion(
    server: OpenAIServer, batch: Batch, rid: str, created: int, prompts, params, echo, include_usage: bool,
    echoes: bool = False,
):
    n = params[0].n
    states: dict[int, ChoiceState] = {}
    finals: list[RequestOutput] = []
    base = {"id": rid, "object": "text_completion", "created": created, "model": batch.model}
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
                    lp = server.logprob_format.completion_logprobs(ids, lps, st)
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
            yield sse_event({**base, "choices": [], "usage": server.usage(prompts, finals)})
        yield "data: [DONE]\n\n"
    finally:
        batch.abort_unfinished()
