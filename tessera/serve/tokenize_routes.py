"""vLLM's `/tokenize` and `/detokenize`.

/tokenize takes a `prompt` (encoded as /v1/completions encodes it, `add_special_tokens` true by
default) or chat `messages` (rendered exactly as /v1/chat/completions renders them, with the server's
chat template; `add_special_tokens` false by default, the template writes its own) and returns
{count, max_model_len, tokens[, token_strs]}. /detokenize takes `tokens` and returns {prompt}; a token
id outside the vocabulary is a 400."""

from __future__ import annotations

from typing import Any

from fastapi import Body, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from tessera.errors import InvalidRequestError
from tessera.serve.errors import APIError
from tessera.serve.protocol import ChatCompletionRequest, ChatMessage, _Request
from tessera.tokenizer import check_text


class TokenizeCompletionRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Request):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def _parse(model: type[_Request], body: dict) -> _Request:
    try:
        return model.model_validate(body)
    except ValidationError as e:  # the same 400 as a route's own body model gives
        raise RequestValidationError(e.errors()) from None


def add_tokenize_routes(app: FastAPI, server) -> None:
    """Adds the two routes for `server` (a serving.OpenAIServer)."""

    def tokenizer():
        if server.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: there is nothing to tokenize with")
        return server.tokenizer

    @app.post("/tokenize")
    async def tokenize(body: dict[str, Any] = Body(...)):
        chat = "messages" in body
        req = _parse(TokenizeChatRequest if chat else TokenizeCompletionRequest, body)
        server.check_model(req.model)
        tok = tokenizer()
        if chat:
            ids = server.encode_chat(ChatCompletionRequest(
                messages=req.messages, add_generation_prompt=req.add_generation_prompt,
                chat_template_kwargs=req.chat_template_kwargs)).ids
            bos = tok.bos_token_id
            if req.add_special_tokens and bos is not None and ids[:1] != [bos]:
                ids = [bos, *ids]
        else:
            try:
                check_text(req.prompt, "prompt")
            except InvalidRequestError as e:
                raise APIError(400, str(e), param="prompt") from e
            ids = list(tok.encode(req.prompt, add_special_tokens=req.add_special_tokens))
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=server.max_model_len, tokens=ids,
                                             token_strs=strs).model_dump(exclude_none=True))

    @app.post("/detokenize")
    async def detokenize(body: dict[str, Any] = Body(...)):
        req = _parse(DetokenizeRequest, body)
        server.check_model(req.model)
        vocab = server.llm.model_config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens: token ids {bad[:8]} are outside the vocabulary [0, {vocab})", param="tokens")
        text = tokenizer().decode(req.tokens)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())
