"""`tessera serve`: load the engine and run uvicorn, draining gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from tessera.serve.app import build_app
from tessera.serve.async_engine import AsyncEngine

log = logging.getLogger("tessera.serve")

try:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn.Server whose first SIGTERM/SIGINT drains the engine (503 to new requests, open ones
        finish within the grace period, the rest are aborted) before uvicorn's own shutdown. A second
        signal falls back to uvicorn's immediate exit."""

        def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace: float):
            super().__init__(config)
            self.engine = engine
            self.grace = grace
            self._loop: asyncio.AbstractEventLoop | None = None
            self._draining = False

        async def serve(self, sockets=None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame) -> None:
            if self._draining or self._loop is None or sig not in (signal.SIGTERM, signal.SIGINT):
                return super().handle_exit(sig, frame)
            self._draining = True
            self.engine.draining = True
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

        async def _drain(self) -> None:
            n = self.engine.num_open
            log.info("shutdown requested: draining %d open request(s) (grace %.1fs)", n, self.grace)
            await self.engine.drain(self.grace)
            await asyncio.sleep(0.05)  # let the handlers write their last chunks
            self.should_exit = True
except ImportError:  # pragma: no cover
    uvicorn = None


def serve(args) -> int:
    """`tessera serve`: load the engine, then run uvicorn until SIGTERM/SIGINT."""
    from tessera.config import EngineConfig
    from tessera.engine.llm_engine import LLMEngine
    from tessera.models.default_model import DEFAULT_MODEL_NAME
    from tessera.serve.config import ServerConfig
    from tessera.tokenizer import load_chat_template

    cfg = ServerConfig.from_cli_args(args)
    chat_template = load_chat_template(cfg.chat_template)  # a bad one fails before the model loads
    llm = LLMEngine(EngineConfig.from_cli_args(args), progress=True)
    names = cfg.served_model_name or [args.model or DEFAULT_MODEL_NAME]
    engine = AsyncEngine(llm, max_waiting=cfg.max_waiting)
    app = build_app(engine, names, api_key=cfg.api_key, chat_template=chat_template,
                    tool_call_parser=cfg.tool_call_parser, lora_modules=cfg.lora_modules,
                    allow_runtime_lora_updating=cfg.allow_runtime_lora_updating)
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="info",
        access_log=bool(getattr(args, "verbose", False)),
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
    )
    server = GracefulServer(config, engine, cfg.shutdown_grace)
    log.info("serving %s on http://%s:%d (max_model_len %d%s)", ", ".join(names), cfg.host, cfg.port,
             llm.max_model_len, "; API key required" if cfg.api_key else "")
    server.run()
    return 0
