"""The OpenAI-compatible HTTP server: FastAPI routes over an AsyncEngine, run by uvicorn.

The routes are wired here; what they do lives beside: serving.py (OpenAIServer, the request checks and
the engine calls every route shares), completions.py and chat.py (the two generation routes),
tokenize_routes.py, tokenizer_info.py. Anything wrong with a request is an APIError, which the handlers
here write as OpenAI's error JSON. Streams are server-sent events ending in `data: [DONE]`; a client
that goes away (mid-stream, or while a non-streamed request runs) gets its request aborted, which frees
its KV blocks at the engine's next turn. SIGTERM drains: new requests get 503, open ones may finish
within `--shutdown-grace` seconds, the rest are aborted (finish_reason "abort"), then uvicorn exits
(launch.py).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessera.errors import AdapterNotFoundError, TesseraError
from tessera.serve.async_engine import AsyncEngine
from tessera.serve.auth import APIKeyMiddleware
from tessera.serve.chat import create_chat_completion
from tessera.serve.completions import create_completion
from tessera.serve.errors import APIError, error_response, param_of, validation_message
from tessera.serve.lora import add_lora_routes, parse_lora_modules
from tessera.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from tessera.serve.serving import OpenAIServer
from tessera.serve.tokenize_routes import add_tokenize_routes
from tessera.serve.tokenizer_info import add_tokenizer_info_route

log = logging.getLogger("tessera.serve")


def note_ignored_fields(req, response: Response) -> Response:
    """Harmless OpenAI fields tessera does not act on (protocol.IGNORED_REQUEST_FIELDS): logged, and
    named in an HTTP Warning header, so that the client can tell they did nothing."""
    ignored = getattr(req, "_ignored_fields", None)
    if ignored:
        log.warning("ignored request field(s) tessera does not act on: %s", ", ".join(ignored))
        response.headers["warning"] = f'299 tessera "ignored fields: {", ".join(ignored)}"'
    return response


def build_app(engine: AsyncEngine, model_name: str | list[str], *, api_key: str | None = None,
              chat_template: str | None = None, tool_call_parser: str | None = None,
              lora_modules: list[str] | None = None, allow_runtime_lora_updating: bool = False) -> FastAPI:
    """model_name: the served model name(s) (--served-model-name); api_key: --api-key (None: open);
    chat_template: --chat-template's text (None: the tokenizer's); lora_modules: --lora-modules entries
    (tessera.serve.lora; each adapter is read and checked here, before serving starts)."""
    server = OpenAIServer(engine, model_name, chat_template=chat_template, tool_call_parser=tool_call_parser,
                          allow_runtime_lora_updating=allow_runtime_lora_updating)
    for name, path, parent in parse_lora_modules(lora_modules):
        server.loras.check_name(name)
        server.loras.add(name, path, parent)

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
        if isinstance(exc, AdapterNotFoundError):  # vLLM's 404 for an adapter it finds no files of
            server.metrics.error(404)
            return error_response(404, str(exc), "not_found_error", "model", "lora_not_found")
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
        roots = {v.name: v.path for v in engine.engine.variants.variants} if engine.engine.variants else {}
        root = str(engine.engine.model_path)
        cards = [ModelCard(id=n, root=roots.get(n, root), max_model_len=server.max_model_len)
                 for n in server.served_model_names]
        cards += [ModelCard(id=name, root=lr.lora_path, parent=server.loras.parents[name] or server.model_name,
                            max_model_len=server.max_model_len) for name, lr in server.loras.by_name.items()]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return note_ignored_fields(req, await create_completion(server, req, raw))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        return note_ignored_fields(req, await create_chat_completion(server, req, raw))

    add_tokenize_routes(app, server)
    add_lora_routes(app, server)
    add_tokenizer_info_route(app, server)
    return app
