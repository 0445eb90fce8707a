"""FleetRouter's picture of its instances between their snapshots (tessera/fleet/router.py), with fake
instances that answer polls with whatever snapshot the test sets: a request sent to an instance counts as
its load until a snapshot shows it taken in, however many older snapshots arrive meanwhile."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from tessera.fleet.instance import InstanceSnapshot
from tessera.fleet.policies import make_policy
from tessera.fleet.router import FleetRouter
from tessera.sampling_params import SamplingParams


class FakeInstance:
    """Answers every poll at once with `snap`; remembers what it was sent."""

    def __init__(self, iid: int):
        self.snap = InstanceSnapshot(iid, free_blocks=100)
        self.sent: list[tuple] = []
        self.polls = 0

    async def call(self, name: str, *args):
        assert name == "poll"
        self.polls += 1
        await asyncio.sleep(0.001)
        return [], self.snap

    def send(self, name: str, *args) -> None:
        self.sent.append((name, *args))

    def kill(self) -> None:
        pass


def test_load_sent_but_not_yet_taken_in_survives_stale_polls():
    async def main():
        fakes = [FakeInstance(0), FakeInstance(1)]
        front = SimpleNamespace(block_size=16)
        router = FleetRouter(fakes, make_policy("least-loaded"), front, poll_timeout=0.001)
        router.start()
        params = SamplingParams(max_tokens=4)
        queue: asyncio.Queue = asyncio.Queue()
        await router.add("a", None, list(range(10, 50)), params, queue)
        polls = fakes[0].polls
        while fakes[0].polls < polls + 3:  # snapshots taken before "a" reached instance 0
            await asyncio.sleep(0.001)
        states = router.states()
        assert (states[0].num_waiting, states[0].prefill_tokens) == (1, 40)
        await router.add("b", None, list(range(10, 30)), params, queue)
        assert [f.sent[0][1] for f in fakes] == ["a", "b"]  # b went to the instance without a request
        # instance 0 takes "a" in: its snapshot now shows it, and the router counts it once, not twice
        fakes[0].snap = InstanceSnapshot(0, num_waiting=1, num_prefilling=1, prefill_tokens=40, free_blocks=100,
                                         submitted=1, submitted_tokens=40)
        polls = fakes[0].polls
        while fakes[0].polls < polls + 2:
            await asyncio.sleep(0.001)
        assert (router.states()[0].num_waiting, router.states()[0].prefill_tokens) == (1, 40)
        assert router.num_waiting == 2
        router.stop()

    asyncio.run(main())
