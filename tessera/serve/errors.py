"""OpenAI's error JSON: the exception the handlers raise, the response it becomes, and the message a
pydantic validation failure turns into."""

from __future__ import annotations

import re

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from tessera.errors import AdapterNotFoundError, TesseraError
from tessera.outputs import RequestOutput
from tessera.serve.protocol import ErrorInfo, ErrorResponse


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def engine_failure(out: RequestOutput) -> APIError:
    """The HTTP error for a request the engine finished with an error. A failure that is the request's
    own (`out.error_cause`, a TesseraError) is a 4xx as vLLM answers it: an adapter whose files are gone
    404 (vLLM's "No adapter found"), one that cannot be loaded otherwise 400; anything else is the
    engine's fault, a 500."""
    message = out.error or "the engine failed this request"
    cause = out.error_cause
    if isinstance(cause, AdapterNotFoundError):
        return APIError(404, message, "not_found_error", param="model", code="lora_not_found")
    if isinstance(cause, TesseraError):
        return APIError(400, message, param="model")
    return APIError(500, message, "internal_error", code=500)


def param_of(e: Exception) -> str | None:
    m = re.match(r"invalid sampling parameter: (\w+)", str(e))
    return m.group(1) if m else None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            return f"Invalid JSON body: {e.get('msg')} ({(e.get('ctx') or {}).get('error', '')})", None
        where = ".".join(loc)
        param = param or (where if e.get("type") == "extra_forbidden" else loc[0] if loc else None)
        if e.get("type") == "extra_forbidden":
            parts.append(f"unknown field '{where}'")
        else:
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "Invalid request: " + "; ".join(parts), param
