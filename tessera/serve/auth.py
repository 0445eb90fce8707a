"""`--api-key`: every route but the open ones needs `Authorization: Bearer <key>`; otherwise a 401 in
OpenAI's error shape (code "invalid_api_key", as OpenAI answers a wrong key).

A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware: it passes streams and client
disconnects through untouched (the handlers abort a request whose client went away)."""

from __future__ import annotations

import secrets

from tessera.serve.errors import error_response

# Probes and scrapers stay open (as vLLM's --api-key leaves them); everything else, /v1/* and the
# tokenizer routes included, needs the key, so a route added later is closed by default.
OPEN_PATHS = frozenset({"/health", "/metrics", "/ping", "/version"})


class APIKeyMiddleware:
    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        value = next((v for k, v in headers if k == b"authorization"), b"")
        scheme, _, token = value.strip().partition(b" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key)

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS
                or self.authorized(scope["headers"])):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401, "Missing or incorrect API key: send the header `Authorization: Bearer <key>` with the key this "
            "server was started with (--api-key).", param="authorization", code="invalid_api_key")
        response.headers["www-authenticate"] = "Bearer"
        await response(scope, receive, send)
