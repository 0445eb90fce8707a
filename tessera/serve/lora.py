"""LoRA adapters in the server, as vLLM serves them.

`--lora-modules name=path ...` (or vLLM's JSON form, `{"name": .., "path": .., "base_model_name": ..}`)
registers adapters at start; `/v1/models` lists them with `parent` = the base model's name, and a
request whose `model` is an adapter's name runs with it. With runtime updating allowed (the flag
--allow-runtime-lora-updating, or env VLLM_ALLOW_RUNTIME_LORA_UPDATING / TESSERA_ALLOW_RUNTIME_LORA_UPDATING
set to 1/true, vLLM's gate), `POST /v1/load_lora_adapter {lora_name, lora_path}` and `POST
/v1/unload_lora_adapter {lora_name}` add and remove adapters: loading a name that exists is a 400, an
adapter that cannot be read (missing directory, unsupported, for another base model) a 400 naming the
problem, unloading an unknown name a 404. Requests already running with an unloaded adapter finish.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from tessera.errors import AdapterNotFoundError, InvalidRequestError, TesseraError
from tessera.lora.adapter import load_adapter
from tessera.lora.request import LoRARequest
from tessera.serve.errors import APIError
from tessera.serve.protocol import _Request

RUNTIME_ENV = ("TESSERA_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")


def runtime_updating_from_env() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in RUNTIME_ENV)


def parse_lora_modules(specs: list[str] | None) -> list[tuple[str, str, str | None]]:
    """`name=path` or a JSON object with name, path and optionally base_model_name, per entry."""
    out = []
    for spec in specs or ():
        if spec.lstrip().startswith("{"):
            try:
                d = json.loads(spec)
                name, path, parent = d["name"], d["path"], d.get("base_model_name")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InvalidRequestError(
                    f"--lora-modules {spec!r}: a JSON entry needs \"name\" and \"path\" ({e})") from e
        else:
            name, sep, path = spec.partition("=")
            parent = None
            if not sep or not name or not path:
                raise InvalidRequestError(f"--lora-modules {spec!r}: expected name=path or a JSON object")
        out.append((name, path, parent))
    return out


class LoadLoRAAdapterRequest(_Request):
    lora_name: str
    lora_path: str
    base_model_name: str | None = None


class UnloadLoRAAdapterRequest(_Request):
    lora_name: str
    lora_int_id: int | None = None


class ServedLoRAs:
    """The adapters a server answers to, by name (the engine's manager holds their weights)."""

    def __init__(self, server, allow_runtime_updating: bool):
        self.server = server
        self.allow_runtime_updating = allow_runtime_updating
        self.by_name: dict[str, LoRARequest] = {}
        self.parents: dict[str, str | None] = {}
        self._ids = itertools.count(1)

    def check_name(self, name: str) -> None:
        if name in self.by_name or name in self.server.served_model_names:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")

    def add(self, name: str, path: str, parent: str | None = None) -> LoRARequest:
        """Check the adapter (read it once, off the event loop's thread when called from a route) and
        serve it under `name`."""
        llm = self.server.llm
        if llm.lora is None:
            raise InvalidRequestError("LoRA adapters need the engine started with --enable-lora")
        req = LoRARequest(name, next(self._ids), path, parent)
        load_adapter(name, path, llm.model_config, llm.lora.max_rank)
        self.by_name[name], self.parents[name] = req, parent
        return req

    def remove(self, name: str) -> None:
        req = self.by_name.pop(name, None)
        if req is None:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "not_found_error", param="lora_name",
                           code="lora_not_found")
        self.parents.pop(name, None)
        self.server.engine.call_in_engine(lambda: self.server.llm.lora.remove(req.lora_int_id))


def add_lora_routes(app: FastAPI, server) -> None:
    loras: ServedLoRAs = server.loras

    def gate() -> None:
        if not loras.allow_runtime_updating:
            raise APIError(404, "runtime LoRA updating is off: start the server with --allow-runtime-lora-updating "
                                "(or VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)", "not_found_error")
        if server.llm.lora is None:
            raise APIError(400, "LoRA is off: start the server with --enable-lora")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRAAdapterRequest):
        gate()
        loras.check_name(req.lora_name)
        try:
            await asyncio.to_thread(loras.add, req.lora_name, req.lora_path, req.base_model_name)
        except AdapterNotFoundError as e:  # vLLM: 404 NotFoundError when it finds no adapter at the path
            raise APIError(404, f"Failed to load LoRA adapter '{req.lora_name}': {e}", "not_found_error",
                           param="lora_path", code="lora_not_found") from e
        except TesseraError as e:
            raise APIError(400, f"Failed to load LoRA adapter '{req.lora_name}': {e}", param="lora_path") from e
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest):
        gate()
        loras.remove(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
