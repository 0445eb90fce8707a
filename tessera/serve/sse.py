"""Server-sent events: the event encoding, per-choice stream state, and the text delta a step adds
(holding back what could still turn out to be the start of a stop string)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from tessera.outputs import CompletionOutput, RequestOutput
from tessera.sampling_params import SamplingParams


def sse_event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class ChoiceState:
    sent_text: int = 0  # characters of the choice's text already sent
    sent_tokens: int = 0  # tokens whose logprobs were already sent
    text_offset: int = 0  # running text offset (legacy completions logprobs)
    done: bool = False


def sse_engine_error(out: RequestOutput) -> str:
    """The OpenAI-style error event sent on a stream whose request the engine failed."""
    message = out.error or "the engine failed this request"
    return sse_event({"error": {"message": message, "type": "internal_error", "param": None, "code": 500}})


def stop_holdback(params: SamplingParams) -> int:
    """Characters to hold back while streaming, so that a stop string never leaks out half-sent."""
    return max((len(s) for s in params.stop_strings), default=1) - 1


def text_delta(st: ChoiceState, o: CompletionOutput, hold: int) -> tuple[str | None, str | None]:
    """(new text to send, finish_reason) for one choice; (None, None) when there is nothing to send."""
    if st.done:
        return None, None
    fin = o.finish_reason
    end = len(o.text) if fin else max(st.sent_text, len(o.text) - hold)
    delta = o.text[st.sent_text : end]
    if not delta and not fin:
        return None, None
    st.sent_text = end
    st.done = fin is not None
    return delta, fin


def streaming_response(gen) -> StreamingResponse:
    return StreamingResponse(
        gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def wait_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return
