"""How the router and the instances call an instance: the same two calls whether it is a Ray actor or an
object in this process (the default test suite's fake actors, which run the same EngineInstance code).

- `call(name, *args)`: an awaitable of the method's result (the router's polls and set-up);
- `send(name, *args)`: fire and forget, in order per caller (KV rows and hand-offs between instances).
A call to an instance that died raises `InstanceDied`.
"""

from __future__ import annotations

import asyncio


class InstanceDied(Exception):
    """The instance (actor) is gone: killed, crashed, or its process exited."""


class LocalHandle:
    """An EngineInstance in this process. Its methods only queue work for its engine thread (poll waits
    for events), so calling them directly is safe from any thread."""

    def __init__(self, instance):
        self.instance = instance

    async def call(self, name: str, *args):
        if self.instance.dead:
            raise InstanceDied(f"instance {self.instance.instance_id} is dead")
        result = await asyncio.to_thread(getattr(self.instance, name), *args)
        if self.instance.dead and name == "poll":
            raise InstanceDied(f"instance {self.instance.instance_id} is dead")
        return result

    def send(self, name: str, *args) -> None:
        if not self.instance.dead:
            getattr(self.instance, name)(*args)

    def kill(self) -> None:
        self.instance.kill()


class RayHandle:
    """An EngineInstance as a Ray actor. Polls run in their own concurrency group, so a poll waiting for
    events never holds back the instance's other calls, which keep their submission order."""

    def __init__(self, actor, instance_id: int):
        self.actor = actor
        self.instance_id = instance_id

    async def call(self, name: str, *args):
        import ray.exceptions

        method = getattr(self.actor, name)
        if name == "poll":
            method = method.options(concurrency_group="poll")
        try:
            return await method.remote(*args)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as e:
            raise InstanceDied(f"instance {self.instance_id} is dead: {type(e).__name__}") from e

    def send(self, name: str, *args) -> None:
        getattr(self.actor, name).remote(*args)  # to a dead actor the call fails, unobserved

    def kill(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)
