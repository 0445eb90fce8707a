"""The fleet over real Ray actors (a local Ray cluster started by the test): the router's requests
complete once with a single engine's greedy output, and an actor killed mid-stream (ray.kill) loses
none: with accellm pairs its partner finishes from its own KV copy. Slow: Ray and one process per
instance start (tests/fleet/test_fleet.py runs the same code with in-process instances by default)."""

from __future__ import annotations

import asyncio

import pytest
from test_fleet import alone, engine_config, prompts, run_fleet  # noqa: F401 (fixtures)

from tessera.fleet.config import FleetConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("policy", ["round-robin", "accellm"])
def test_ray_fleet_survives_a_killed_actor(ray_cluster, model_dir, prompts, alone, policy):  # noqa: F811
    fleet = FleetConfig(instances=2, backend="ray", routing=policy)
    seen = {}

    async def kv_then_kill(router) -> int:
        owner = router.requests["r0"].owner
        seen["owner"] = await router.handles[owner].call("kv_of", "r0")
        seen["partner"] = await router.handles[1 - owner].call("kv_of", "r0")
        return owner

    finals, counts, router, killed = asyncio.run(
        run_fleet(engine_config(model_dir), fleet, prompts, kill_after=4, pick=kv_then_kill))
    assert router.deaths == [killed]
    assert counts == [1] * len(prompts)
    assert [f.outputs[0].token_ids for f in finals] == alone
    if policy == "accellm":
        holds = [seen["owner"]["running"], seen["partner"]["running"]]
        assert any(n is not None and n >= len(prompts[0]) for n in holds), seen  # KV where it decodes
        copies = [seen["owner"]["copy"], seen["partner"]["copy"]]
        assert any(n is not None and n >= len(prompts[0]) for n in copies), seen  # and a copy on the other
