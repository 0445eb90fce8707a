"""FleetRouter: the front of a fleet of engine instances, in the shape of serve.AsyncEngine, so the
OpenAI server (tessera/serve) runs on it unchanged.

It asks the routing policy (tessera.fleet.policies: the same code the simulator drives) where each
request goes, given a snapshot of every instance, and carries out what the policy says: the placement
(and, for AcceLLM pairs, which partner receives the KV copy), the hand-off after the prefill (KV moved
for pd-split, decode on the member holding a copy for accellm), the in-pair moves of `rebalance`, and,
when an instance dies, where each of its requests goes on (`on_death`: from the partner's copy, or run
again elsewhere from its prompt and the tokens already delivered, so the stream goes on where it stopped).

A request's outputs may come from any instance that runs it; the router keeps the longest it has seen
and delivers each request's final output exactly once (a request recovered twice, or whose move raced a
death, finishes once; the other copy is aborted).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tessera.engine.block_manager import chain_hash
from tessera.engine.migration import SeqState
from tessera.errors import InvalidRequestError
from tessera.fleet.handles import InstanceDied
from tessera.fleet.instance import InstanceSnapshot
from tessera.fleet.metrics import FleetResult, InstanceRecord, RequestRecord
from tessera.fleet.policies import MOVE_COOLDOWN, REBALANCE_EVERY, InstanceState, RequestInfo, RoutingPolicy, pair_of
from tessera.outputs import RequestOutput
from tessera.sampling_params import SamplingParams
from tessera.serve.async_engine import QueueFullError, RequestHandle, ShuttingDownError, Snapshot

log = logging.getLogger("tessera.fleet")


class PrefixIndex:
    """The router's picture of one instance's prefix cache: the chain hashes (the block manager's) of the
    full blocks of every prompt sent there. Approximate (it does not see evictions), like SGLang's
    cache-aware router."""

    def __init__(self, block_size: int, capacity: int = 1 << 16):
        self.block_size = block_size
        self.capacity = capacity
        self.hashes: dict[int, None] = {}

    def _chain(self, token_ids):
        bs, h = self.block_size, None
        for i in range(len(token_ids) // bs):
            h = chain_hash(h, token_ids[i * bs:(i + 1) * bs])
            yield h

    def add(self, token_ids) -> None:
        for h in self._chain(token_ids):
            self.hashes.pop(h, None)
            self.hashes[h] = None
        while len(self.hashes) > self.capacity:
            self.hashes.pop(next(iter(self.hashes)))

    def match(self, token_ids) -> int:
        n = 0
        for h in self._chain(token_ids):
            if h not in self.hashes:
                break
            n += self.block_size
        return n


@dataclass
class _Request:
    info: RequestInfo
    prompt: str | None
    params: SamplingParams
    stream: bool
    deliver: Callable[[RequestOutput], None]
    record: RequestRecord
    owner: int
    holders: set[int] = field(default_factory=set)  # instances that may run it (aborted there at the end)
    last: RequestOutput | None = None
    first_token_time: float | None = None
    finished: bool = False
    movable: bool = True  # may move between instances (LLMEngine.export_request takes it)
    moved_at: float = -1e9  # when the router last asked for it to move (rebalancing leaves it alone a while)


class FleetRouter:
    """AsyncEngine's surface (add, abort, snapshot, check_capacity, start/stop/drain) over N instances."""

    def __init__(self, handles: list, policy: RoutingPolicy, front, max_waiting: int = 1024,
                 poll_timeout: float = 0.02, rebalance_every: float = REBALANCE_EVERY, keep_records: bool = False):
        """keep_records: keep every request's RequestRecord (tessera bench fleet; a server keeps none)."""
        self.handles = handles
        self.policy = policy
        self.engine = front  # what the HTTP layer reads: tokenizer, limits, checks (tessera.fleet.front)
        self.max_waiting = max_waiting
        self.poll_timeout = poll_timeout
        self.rebalance_every = rebalance_every
        self.keep_records = keep_records
        self.move_cooldown = MOVE_COOLDOWN  # seconds a moved request stays put before rebalancing may move it again
        n = len(handles)
        self.roles = policy.roles(n)
        self.live = [True] * n
        self.snaps = [InstanceSnapshot(i) for i in range(n)]
        self.prefix = [PrefixIndex(front.block_size) for _ in range(n)]
        self.requests: dict[str, _Request] = {}
        self.records: list[RequestRecord] = []
        self.draining = False
        self.step_failures = 0
        self.deaths: list[int] = []
        self._tasks: list[asyncio.Task] = []
        self._sent = [0] * n  # submits sent to each instance, and their prompt tokens: what its snapshot
        self._sent_tokens = [0] * n  # has not taken in yet (snap.submitted) is load the policy must still see
        self._pending_adopts = [0] * n  # recoveries sent since the instance's last snapshot
        self._started = time.monotonic()

    # -- AsyncEngine's surface ---------------------------------------------------------------------
    def start(self) -> None:
        if not self._tasks:
            self._loop = asyncio.get_running_loop()
            self._started = time.monotonic()
            self._tasks = [asyncio.ensure_future(self._poll_loop(i)) for i in range(len(self.handles))]
            self._tasks.append(asyncio.ensure_future(self._rebalance_loop()))

    def stop(self, timeout: float = 10.0) -> None:
        self.draining = True
        tasks, self._tasks = self._tasks, []
        if tasks:  # from any thread (the server's lifespan stops it from a worker thread)
            self._loop.call_soon_threadsafe(lambda: [t.cancel() for t in tasks])

    @property
    def alive(self) -> bool:
        return any(self.live)

    @property
    def snapshot(self) -> Snapshot:
        live = [s for s, a in zip(self.snaps, self.live, strict=True) if a]
        queries = sum(s.prefix_queries for s in live)
        return Snapshot(running=sum(s.num_running for s in live), waiting=sum(s.num_waiting for s in live),
                        kv_blocks_used=sum(s.used_blocks for s in live),
                        kv_blocks_total=sum(s.used_blocks + s.free_blocks for s in live),
                        prefix_hit_rate=sum(s.prefix_hits for s in live) / queries if queries else 0.0,
                        prompt_tokens=sum(s.prompt_tokens for s in self.snaps),
                        generation_tokens=sum(s.generation_tokens for s in self.snaps),
                        steps=sum(s.steps for s in self.snaps), alive=self.alive)

    @property
    def num_waiting(self) -> int:
        return sum(s.num_waiting for s in self.snaps) + sum(map(self._pending, range(len(self.snaps))))

    def _pending(self, i: int) -> int:
        """Requests sent to instance i that its latest snapshot does not show yet."""
        return max(0, self._sent[i] - self.snaps[i].submitted) + self._pending_adopts[i]

    def _pending_tokens(self, i: int) -> int:
        return max(0, self._sent_tokens[i] - self.snaps[i].submitted_tokens)

    @property
    def num_open(self) -> int:
        return sum(not r.finished for r in self.requests.values())

    def check_capacity(self, num_requests: int = 1) -> None:
        if self.draining:
            raise ShuttingDownError("the server is shutting down and accepts no new requests")
        if not self.alive:
            raise ShuttingDownError("no engine instance is alive")
        if self.num_waiting + num_requests > self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.num_waiting} waiting, limit {self.max_waiting})")

    async def drain(self, grace: float) -> None:
        self.draining = True
        deadline = time.monotonic() + grace
        while self.num_open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in [r for r, q in self.requests.items() if not q.finished]:
            self.abort(rid)

    def call_in_engine(self, fn) -> None:
        raise NotImplementedError("runtime changes (LoRA adapters) are not supported on a fleet")

    async def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                  queue: asyncio.Queue, tag: object = None, stream: bool = True, lora_request=None,
                  model: str | None = None) -> RequestHandle:
        self.check_capacity()
        if lora_request is not None:
            raise InvalidRequestError("LoRA adapters are not served by a fleet")
        if model is not None:
            raise InvalidRequestError("a fleet serves one model (--models block sharing is not served by a fleet)")
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        handle = RequestHandle(request_id, tag)

        def deliver(out: RequestOutput) -> None:
            if out.finished:
                handle.finished = True
            queue.put_nowait((tag, out))

        now = time.monotonic()
        info = RequestInfo(request_id, tuple(prompt_token_ids), params.max_tokens or 0)
        record = RequestRecord(request_id, now - self._started, len(prompt_token_ids))
        if self.keep_records:
            self.records.append(record)
        req = _Request(info, prompt, params, stream, deliver, record, owner=-1)
        self.requests[request_id] = req
        # what export_request takes (the others stay where they start; after a death they run again)
        movable = params.num_sequences == 1 and params.prompt_logprobs is None and not params.prompt_entropies
        placement = self.policy.route(info, self.states())
        req.movable = movable
        self._place(req, placement.prefill, placement.replicate_to if movable else None, movable)
        return handle

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        for i in req.holders:
            if self.live[i]:
                self.handles[i].send("abort", request_id)
        self._finish(req, self._aborted(req))

    # -- placement ---------------------------------------------------------------------------------
    def states(self) -> list[InstanceState]:
        out = []
        for i, s in enumerate(self.snaps):
            out.append(InstanceState(
                i, role=self.roles[i], pair_id=pair_of(i) if self.policy.uses_pairs else None, alive=self.live[i],
                num_running=s.num_running, num_waiting=s.num_waiting + self._pending(i),
                num_prefilling=s.num_prefilling + self._pending(i),
                prefill_tokens=s.prefill_tokens + self._pending_tokens(i), free_blocks=s.free_blocks,
                used_blocks=s.used_blocks, redundant_blocks=s.redundant_blocks, block_size=self.engine.block_size,
                prefix_match=self.prefix[i].match))
        return out

    def _place(self, req: _Request, instance: int, replicate_to: int | None, report_prefill: bool) -> None:
        rid = req.info.request_id
        req.owner = instance
        req.holders.update({instance} | ({replicate_to} if replicate_to is not None else set()))
        req.record.instances.append(instance)
        self._sent[instance] += 1
        self._sent_tokens[instance] += len(req.info.prompt_token_ids)
        self.prefix[instance].add(req.info.prompt_token_ids)
        wants_handoff = report_prefill and type(self.policy).after_prefill is not RoutingPolicy.after_prefill
        self.handles[instance].send("submit", rid, req.prompt, list(req.info.prompt_token_ids), req.params,
                                    replicate_to, wants_handoff)

    def _state_of(self, req: _Request) -> SeqState:
        """The request as delivered so far: where a recovery goes on from."""
        out = req.last.outputs[0] if req.last is not None and req.last.outputs else None
        return SeqState(req.info.request_id, req.prompt, list(req.info.prompt_token_ids),
                        list(out.token_ids) if out else [], req.params,
                        list(out.logprobs or []) if out else [], out.cumulative_logprob or 0.0 if out else 0.0)

    # -- instance events ---------------------------------------------------------------------------
    async def _poll_loop(self, i: int) -> None:
        handle = self.handles[i]
        while self.live[i]:
            try:
                events, snap = await handle.call("poll", self.poll_timeout)
            except asyncio.CancelledError:
                raise
            except InstanceDied:
                self._on_death(i)
                return
            except Exception:  # a transport hiccup is not a death; try again
                log.exception("poll of instance %d failed", i)
                await asyncio.sleep(0.05)
                continue
            self.snaps[i] = snap
            self._pending_adopts[i] = 0
            for ev in events:
                self._on_event(i, ev)
            if snap.failed:  # its engine raised: the instance is as good as dead
                self.step_failures += 1
                handle.kill()
                self._on_death(i)
                return

    def _on_event(self, i: int, ev: tuple) -> None:
        kind = ev[0]
        if kind == "out":
            self._on_output(i, ev[1])
        elif kind == "prefilled":
            req = self.requests.get(ev[1])
            if req is None or req.finished or req.owner != i:
                return
            snaps = self.snaps
            handoff = self.policy.after_prefill(req.info, i, self.states(),
                                                has_copy=lambda j: req.info.request_id in snaps[j].copies)
            if handoff.decode != i and self.live[handoff.decode]:
                req.moved_at = time.monotonic()
                self.handles[i].send("move", req.info.request_id, handoff.decode, handoff.move_kv, handoff.keep_copy)
        elif kind == "moved":
            req = self.requests.get(ev[1])
            if req is not None and not req.finished:
                req.owner = ev[2]
                req.holders.add(ev[2])
                req.record.instances.append(ev[2])
                if not self.live[ev[2]]:  # it moved to an instance that has died since: lost on the way
                    self._recover(ev[2], [req])
        elif kind == "error":
            req = self.requests.get(ev[1])
            if req is not None and not req.finished:
                self._finish(req, RequestOutput(ev[1], req.prompt, list(req.info.prompt_token_ids), [],
                                                finished=True, error=ev[2]))

    def _on_output(self, i: int, out: RequestOutput) -> None:
        req = self.requests.get(out.request_id)
        if req is None or req.finished:
            return
        n_old = len(req.last.outputs[0].token_ids) if req.last is not None and req.last.outputs else 0
        n_new = len(out.outputs[0].token_ids) if out.outputs else 0
        if n_new < n_old or (n_new == n_old and not out.finished):
            return  # an older view (from the instance it left, or a recovery replaying what was delivered)
        now = time.monotonic()
        if n_new > n_old:
            req.record.token_times.extend([now - self._started] * (n_new - n_old))
            if req.first_token_time is None:
                req.first_token_time = now
        out.metrics = {**out.metrics, "first_token_time": req.first_token_time}
        req.last = out
        if out.finished:
            out.metrics["finish_time"] = now
            self._finish(req, out)
            for j in req.holders - {i}:
                if self.live[j]:
                    self.handles[j].send("abort", out.request_id)
        elif req.stream:
            req.deliver(out)

    def _aborted(self, req: _Request) -> RequestOutput:
        from tessera.outputs import CompletionOutput

        last = req.last
        outs = [CompletionOutput(o.index, o.text, o.token_ids, "abort") for o in last.outputs] if last else []
        return RequestOutput(req.info.request_id, req.prompt, list(req.info.prompt_token_ids), outs, finished=True)

    def _finish(self, req: _Request, out: RequestOutput) -> None:
        req.finished = True
        req.record.completions += 1
        req.record.finish = time.monotonic() - self._started
        del self.requests[req.info.request_id]
        req.deliver(out)

    # -- faults and rebalancing --------------------------------------------------------------------
    def _on_death(self, dead: int) -> None:
        if not self.live[dead]:
            return
        self.live[dead] = False
        self.deaths.append(dead)
        orphans = [r for r in self.requests.values() if r.owner == dead and not r.finished]
        log.warning("instance %d died; recovering its %d request(s)", dead, len(orphans))
        if not self.alive:
            for req in orphans:
                self._finish(req, RequestOutput(req.info.request_id, req.prompt, list(req.info.prompt_token_ids),
                                                [], finished=True, error="every engine instance died"))
            return
        self._recover(dead, orphans)

    def _recover(self, dead: int, orphans: list[_Request]) -> None:
        snaps = self.snaps
        plan = self.policy.on_death(dead, [r.info for r in orphans], self.states(),
                                    has_copy=lambda rid, j: rid in snaps[j].copies)
        for req in orphans:
            rec = plan[req.info.request_id]
            if not req.movable:  # e.g. several sequences: run again from the prompt (what
                # was streamed already is not sent twice: outputs shorter than the delivered one are dropped)
                self._place(req, rec.instance, None, False)
                continue
            req.owner = rec.instance
            req.holders.add(rec.instance)
            req.record.instances.append(rec.instance)
            self._pending_adopts[rec.instance] += 1
            self.handles[rec.instance].send("adopt", self._state_of(req), rec.from_copy, None)

    async def _rebalance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.rebalance_every)
            for move in self.policy.rebalance(self.states()):
                if not (self.live[move.src] and self.live[move.dst]):
                    continue
                copies = self.snaps[move.dst].copies
                # not one asked to move lately: the snapshots it was decided on may not show that move yet
                now = time.monotonic()
                movable = [r for r in self.requests.values()
                           if r.owner == move.src and r.info.request_id in copies and r.last is not None
                           and now - r.moved_at > self.move_cooldown]
                for req in movable[:move.count]:
                    req.moved_at = now
                    self.handles[move.src].send("move", req.info.request_id, move.dst, False, True,
                                                move.while_prefilling)

    # -- results (tessera bench fleet) -------------------------------------------------------------
    async def instance_records(self, kv_bytes_per_block: int) -> list[InstanceRecord]:
        span = time.monotonic() - self._started
        samples = [await h.call("step_samples") if live else [] for h, live in zip(self.handles, self.live,
                                                                                   strict=True)]
        return [InstanceRecord(i, str(self.roles[i]), busy_time=s.busy_time, span=span, steps=s.steps,
                               peak_kv_blocks=s.peak_used_blocks, kv_bytes_per_block=kv_bytes_per_block,
                               step_samples=samples[i])
                for i, s in enumerate(self.snaps)]

    def result(self, records: list[InstanceRecord], config: dict) -> FleetResult:
        return FleetResult(self.policy.name, len(self.handles), "real", list(self.records), records, config)


class FleetCollector:
    """Per-instance series beside the server's summed ones on /metrics: `tessera:fleet_*{instance="i"}`."""

    def __init__(self, router: FleetRouter, model_name: str):
        self.router = router
        self.model_name = model_name

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        r = self.router
        labels = ["model_name", "instance", "role"]
        fams = {
            "alive": GaugeMetricFamily("tessera:fleet_instance_alive", "1 while the instance lives.", labels=labels),
            "running": GaugeMetricFamily("tessera:fleet_num_requests_running", "Running sequences.", labels=labels),
            "waiting": GaugeMetricFamily("tessera:fleet_num_requests_waiting", "Waiting sequences.", labels=labels),
            "used": GaugeMetricFamily("tessera:fleet_kv_cache_blocks_used", "KV blocks in use.", labels=labels),
            "redundant": GaugeMetricFamily("tessera:fleet_kv_cache_blocks_redundant",
                                           "KV blocks held as a partner's redundant copy (accellm).", labels=labels),
            "steps": CounterMetricFamily("tessera:fleet_engine_steps", "Engine steps.", labels=labels),
            "dropped": CounterMetricFamily("tessera:fleet_copies_dropped",
                                           "Redundant copies dropped under memory pressure.", labels=labels),
        }
        for i, s in enumerate(r.snaps):
            lab = [self.model_name, str(i), str(r.roles[i])]
            fams["alive"].add_metric(lab, 1.0 if r.live[i] else 0.0)
            fams["running"].add_metric(lab, s.num_running)
            fams["waiting"].add_metric(lab, s.num_waiting)
            fams["used"].add_metric(lab, s.used_blocks)
            fams["redundant"].add_metric(lab, s.redundant_blocks)
            fams["steps"].add_metric(lab, s.steps)
            fams["dropped"].add_metric(lab, s.copies_dropped)
        yield from fams.values()
