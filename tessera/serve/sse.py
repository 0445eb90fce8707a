"""Server-sent events: the event encoding, per-choice stream state, and the text delta a step adds."""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse

from tessera.outputs import CompletionOutput, RequestOutput
from tessera.serve.errors import engine_failure


def sse_event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _utf8_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")("replace")


@dataclass
class ChoiceState:
    sent_text: int = 0  # characters of the choice's text already sent
    sent_tokens: int = 0  # tokens whose logprobs were already sent
    text_offset: int = 0  # running text offset (legacy completions logprobs), in characters
    # the tokens' bytes so far, for text_offset: a character split over tokens counts once, when complete
    utf8: codecs.IncrementalDecoder = field(default_factory=_utf8_decoder)
    done: bool = False


def sse_engine_error(out: RequestOutput) -> str:
    """The OpenAI-style error event sent on a stream whose request the engine failed."""
    e = engine_failure(out)
    return sse_event({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})


def text_delta(st: ChoiceState, o: CompletionOutput) -> tuple[str | None, str | None]:
    """(new text to send, finish_reason) for one choice; (None, None) when there is nothing to send.
    The engine's output text only ever grows (tessera.engine.output_processor holds back what could
    still be cut as a stop string), so the delta is what it shows beyond what was sent."""
    if st.done:
        return None, None
    fin = o.finish_reason
    delta = o.text[st.sent_text :]
    if not delta and not fin:
        return None, None
    st.sent_text = len(o.text)
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
