"""Starting a fleet: N engine instances (Ray actors, or objects in this process), connected to each
other for KV transfer, behind one FleetRouter; and `tessera serve --instances N`, which puts the OpenAI
server (tessera/serve) in front of the router."""

from __future__ import annotations

import dataclasses
import logging
import os

from tessera.config import EngineConfig
from tessera.fleet.config import FleetConfig
from tessera.fleet.handles import LocalHandle, RayHandle
from tessera.fleet.policies import make_policy

log = logging.getLogger("tessera.fleet")


def start_instances(engine_config: EngineConfig, fleet: FleetConfig) -> list:
    """The instances' handles, each connected to all the others."""
    if fleet.backend == "local":  # threads of this process share its torch thread pool: left as it is
        from tessera.fleet.instance import EngineInstance

        handles = [LocalHandle(EngineInstance(i, engine_config, fleet.routing)) for i in range(fleet.instances)]
        for h in handles:
            h.instance.connect({j: o for j, o in enumerate(handles)})
        return handles
    return _start_ray(dataclasses.replace(engine_config, num_threads=fleet.instance_threads), fleet)


def init_ray(fleet: FleetConfig) -> None:
    """Join --ray-address, or start a local cluster (once per process). Call it from the main thread: Ray
    sets signal handlers there."""
    try:
        import ray
    except ImportError as e:
        from tessera.errors import InvalidRequestError

        raise InvalidRequestError("--backend ray needs Ray: pip install 'tessera-llm[fleet]'") from e
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ("PYTHONPATH", "TESSERA_AUTO_CPU_DTYPE", "HF_HUB_OFFLINE") if k in os.environ}
    env["OMP_NUM_THREADS"] = str(fleet.instance_threads)
    if fleet.ray_address:
        ray.init(address=fleet.ray_address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:  # a local cluster: every instance gets a slot even on a machine with fewer cores
        ray.init(num_cpus=max(os.cpu_count() or 1, fleet.instances), include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=True)


def _start_ray(config: EngineConfig, fleet: FleetConfig) -> list:
    import ray

    from tessera.fleet.instance import EngineInstance

    init_ray(fleet)
    actor_cls = ray.remote(num_cpus=1, concurrency_groups={"poll": 1})(EngineInstance)
    actors = [actor_cls.remote(i, config, fleet.routing) for i in range(fleet.instances)]
    handles = [RayHandle(a, i) for i, a in enumerate(actors)]
    ray.get([a.connect.remote({j: h for j, h in enumerate(handles)}) for a in actors])  # also: every one loaded
    return handles


async def start_router(engine_config: EngineConfig, fleet: FleetConfig, max_waiting: int = 1024,
                       keep_records: bool = False):
    """The instances and a FleetRouter over them (its event loop is the caller's)."""
    import asyncio

    from tessera.fleet.front import EngineFront
    from tessera.fleet.router import FleetRouter

    fleet.validate()
    handles = await asyncio.to_thread(start_instances, engine_config, fleet)
    info = await handles[0].call("info")
    front = EngineFront(engine_config, info["num_blocks"])
    router = FleetRouter(handles, make_policy(fleet.routing), front, max_waiting=max_waiting,
                         keep_records=keep_records)
    router.kv_bytes_per_block = info["kv_bytes_per_block"]
    return router


def stop_instances(handles: list) -> None:
    for h in handles:
        if isinstance(h, LocalHandle):
            h.instance.shutdown()
    if handles and isinstance(handles[0], RayHandle):
        import ray

        for h in handles:
            ray.kill(h.actor, no_restart=True)


def serve_fleet(args) -> int:
    """`tessera serve --instances N`: the router and the OpenAI server in this process, the engines in
    Ray actors (or threads with --backend local)."""
    import asyncio

    import uvicorn

    from tessera.fleet.router import FleetCollector
    from tessera.models.default_model import DEFAULT_MODEL_NAME
    from tessera.models.loader import resolve_model_path
    from tessera.serve.app import build_app
    from tessera.serve.config import ServerConfig
    from tessera.serve.launch import GracefulServer
    from tessera.tokenizer import load_chat_template

    cfg = ServerConfig.from_cli_args(args)
    fleet = FleetConfig.from_cli_args(args)
    engine_config = EngineConfig.from_cli_args(args)
    fleet.validate()
    chat_template = load_chat_template(cfg.chat_template)
    resolve_model_path(engine_config.model)  # a default model converted once here, not by every actor at once
    if fleet.backend == "ray":
        init_ray(fleet)
    names = cfg.served_model_name or [args.model or DEFAULT_MODEL_NAME]

    async def main() -> None:
        router = await start_router(engine_config, fleet, cfg.max_waiting)
        app = build_app(router, names, api_key=cfg.api_key, chat_template=chat_template,
                        tool_call_parser=cfg.tool_call_parser)
        app.state.server.metrics.registry.register(FleetCollector(router, names[0]))
        config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=5,
                                timeout_keep_alive=5, access_log=bool(getattr(args, "verbose", False)))
        log.info("serving %s on http://%s:%d: %d instances (%s), routing %s", ", ".join(names), cfg.host, cfg.port,
                 fleet.instances, fleet.backend, fleet.routing)
        try:
            await GracefulServer(config, router, cfg.shutdown_grace).serve()
        finally:
            stop_instances(router.handles)

    asyncio.run(main())
    return 0
