"""vLLM's `GET /tokenizer_info`: the tokenizer's configuration (what tokenizer_config.json holds) plus
`tokenizer_class`, special tokens as their text.

lm-evaluation-harness's `local-completions` probes it (it needs `eos_token`, and `/tokenize` answering
`{"tokens": [...]}`) and then tokenizes through the server (`tokenizer_backend=remote`) instead of
fetching the model's tokenizer from the hub, which fails offline."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from tessera.serve.errors import APIError

# init_kwargs that say nothing about tokenization, or only where the files lay on the server
_LEFT_OUT = {"name_or_path", "vocab_file", "merges_file", "tokenizer_file", "is_local", "local_files_only",
             "backend", "cache_dir"}


def _plain(value):
    """JSON-able: an AddedToken as its text, containers recursively, anything else as str."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if hasattr(value, "content"):  # tokenizers' AddedToken
        return value.content
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def tokenizer_info(tokenizer, max_model_len: int, chat_template: str | None = None) -> dict:
    info = {k: _plain(v) for k, v in tokenizer.init_kwargs.items() if k not in _LEFT_OUT}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        info[name] = _plain(getattr(tokenizer, name, None))
    info["chat_template"] = chat_template or tokenizer.chat_template
    info["model_max_length"] = max_model_len  # what this server accepts, not the tokenizer's nominal limit
    return {"tokenizer_class": type(tokenizer).__name__, **info}


def add_tokenizer_info_route(app: FastAPI, server) -> None:
    """Adds the route for `server` (a serving.OpenAIServer)."""

    @app.get("/tokenizer_info")
    async def get_tokenizer_info():
        if server.tokenizer is None:
            raise APIError(404, "this model has no tokenizer", "not_found_error")
        return JSONResponse(tokenizer_info(server.tokenizer, server.max_model_len, server.chat_template))
