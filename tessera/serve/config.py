"""`tessera serve`'s own flags, one per ServerConfig field (tessera/config_args.py), beside the engine's.

Importable without the server extras: the command line is built before anything is served."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from tessera.config_args import add_config_args, arg, config_kwargs

API_KEY_ENV = ("TESSERA_API_KEY", "VLLM_API_KEY")  # read, in this order, when --api-key is not given


@dataclass
class ServerConfig:
    host: str = arg("127.0.0.1", "address to listen on")
    port: int = arg(8000, "port to listen on")
    served_model_name: list[str] | None = arg(
        None, "the model name(s) the API answers to (default: --model, or the default model's name); the first "
        "is the one responses carry, a request's `model` must be one of them", nargs="+", type=str)
    api_key: str | None = arg(None, "require `Authorization: Bearer <key>` on every route but /health and "
                              f"/metrics (default: ${API_KEY_ENV[0]}, else ${API_KEY_ENV[1]}; none: open)")
    chat_template: str | None = arg(None, "the chat template for chat requests and /tokenize: a Jinja file, or the "
                                    "template itself (default: the tokenizer's)")
    # the names of tessera.serve.tool_parsers.TOOL_PARSERS (not imported: this module needs no server extras)
    tool_call_parser: str | None = arg(None, "how tool calls are read from the output for tool_choice \"auto\" "
                                       "(vLLM's flag; none: auto tool choice is refused)", choices=["hermes"])
    lora_modules: list[str] | None = arg(
        None, "with --enable-lora, adapters served by name: name=path, or JSON {\"name\": .., \"path\": .., "
        "\"base_model_name\": ..}; a request's `model` names one", nargs="+", type=str)
    allow_runtime_lora_updating: bool = arg(
        False, "POST /v1/load_lora_adapter and /v1/unload_lora_adapter (default: on when "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING or TESSERA_ALLOW_RUNTIME_LORA_UPDATING is 1/true)")
    max_waiting: int = arg(1024, "waiting-queue bound (429 past it)")
    shutdown_grace: float = arg(30.0, "seconds to finish in-flight requests on SIGTERM")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerConfig:
        cfg = cls(**config_kwargs(args, cls))
        if not cfg.allow_runtime_lora_updating:
            from tessera.serve.lora import runtime_updating_from_env

            cfg.allow_runtime_lora_updating = runtime_updating_from_env()
        if cfg.api_key is None:
            cfg.api_key = next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)
        return cfg


def add_server_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser.add_argument_group("server"), ServerConfig)
