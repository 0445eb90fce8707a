"""Structured output on the server: the request fields that constrain the output, turned into one
GuidedDecodingParams (tessera.guided_params), compiled at once so that a bad one is a 400 naming it.

Accepted on /v1/completions and /v1/chat/completions, at most one of:
- OpenAI's `response_format`: {"type": "text"} (no constraint), {"type": "json_object"},
  {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}};
- vLLM's `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`;
- vLLM's newer `structured_outputs`: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
  (plus `disable_any_whitespace`).
"""

from __future__ import annotations

from typing import Any

from tessera.errors import InvalidRequestError
from tessera.guided_params import KINDS, GuidedDecodingParams
from tessera.serve.errors import APIError

_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}
_STRUCTURED_OPTIONS = {"disable_any_whitespace"}


def _from_response_format(rf: dict[str, Any]) -> dict[str, Any] | None:
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(400, "response_format.json_schema must be an object holding the schema",
                           param="response_format.json_schema")
        schema = spec.get("schema", spec.get("json_schema"))
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                           param="response_format.json_schema.schema")
        return {"json": schema}
    raise APIError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                   param="response_format.type")


def _from_structured_outputs(so: dict[str, Any]) -> dict[str, Any] | None:
    unknown = sorted(set(so) - set(KINDS) - _STRUCTURED_OPTIONS)
    if unknown:
        raise APIError(400, f"structured_outputs: unsupported key(s) {', '.join(unknown)}; "
                            f"use one of {', '.join(KINDS)}", param="structured_outputs")
    spec = {k: v for k, v in so.items() if v is not None}
    return spec or None


def guided_from_request(req, grammars) -> GuidedDecodingParams | None:
    """The request's output constraint, compiled (cached) by `grammars` (tessera.engine.guided), or None.
    Raises APIError 400 naming the field that is wrong."""
    found: list[tuple[str, dict[str, Any]]] = []
    if req.response_format is not None:
        spec = _from_response_format(req.response_format)
        if spec is not None:
            found.append(("response_format", spec))
    for name, kind in _GUIDED_FIELDS.items():
        value = getattr(req, name)
        if value is not None:
            found.append((name, {kind: value}))
    if req.structured_outputs is not None:
        spec = _from_structured_outputs(req.structured_outputs)
        if spec is not None:
            found.append(("structured_outputs", spec))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise APIError(400, f"set at most one output constraint; got {names}", param=found[1][0])
    field, spec = found[0]
    try:
        params = GuidedDecodingParams(**spec)
        grammars.compile(params)
    except InvalidRequestError as e:
        raise APIError(400, f"{field}: {e}", param=field) from e
    except TypeError as e:  # a key GuidedDecodingParams does not take
        raise APIError(400, f"{field}: {e}", param=field) from e
    return params
