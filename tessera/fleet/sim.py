"""`tessera sim`: a discrete-event simulator of a fleet of tessera instances replaying a request trace.

Each simulated instance is tessera's own scheduler and KV block manager (tessera/engine/scheduler.py,
block_manager.py) with a fake model step: the scheduler plans every step exactly as in the engine
(continuous batching, chunked prefill, prefix cache, preemption), the step's duration comes from a cost
model (tessera/fleet/cost_model.py), and when it ends the simulator does what LLMEngine.step does with the
plan (computed tokens advance, full blocks enter the prefix cache, sampled positions get a token). Routing
is the routing policy of tessera/fleet/policies.py, the same object the real router calls, fed snapshots
of the simulated instances. KV moves (pd-split's handoff, accellm's copies) take the cost model's link
time; an accellm copy streams during the step that produces it and is whole one layer's transfer after it.

Events: a request arrives; an instance's step ends; KV arrives on an instance; an instance dies. Ties are
broken by insertion order, so a run is a deterministic function of its inputs and seed.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
from collections import deque
from dataclasses import dataclass, field

from tessera.config_args import arg
from tessera.engine.block_manager import BlockManager
from tessera.engine.scheduler import Scheduler, SchedulerOutput
from tessera.engine.sequence import SeqStatus, Sequence
from tessera.errors import InvalidRequestError
from tessera.fleet.cost_model import CostModel, StepShape
from tessera.fleet.metrics import FleetResult, InstanceRecord, RequestRecord
from tessera.fleet.policies import (
    MOVE_COOLDOWN,
    REBALANCE_EVERY,
    CopyInfo,
    InstanceState,
    RequestInfo,
    Role,
    RoutingPolicy,
    make_policy,
)
from tessera.fleet.trace import TraceRequest
from tessera.sampling_params import SamplingParams


def _parse_kill(text: str) -> tuple[int, float]:
    iid, _, t = text.partition("@")
    try:
        return int(iid), float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kill takes ID@SECONDS, got {text!r}") from None


@dataclass
class SimConfig:
    policy: str = "least-loaded"
    num_instances: int = 2
    num_blocks: int = arg(2048, "usable KV blocks per simulated instance")
    block_size: int = arg(16, "tokens per KV block")
    max_num_seqs: int = arg(256, "sequences scheduled at once per instance")
    max_num_batched_tokens: int = arg(2048, "tokens one step computes per instance")
    enable_prefix_caching: bool = arg(True, "the automatic prefix cache", flags=("--enable-prefix-caching",))
    # Instances sharing one host's cores (a CPU fleet) without a fitted contention in the cost model: a
    # step runs slower by stepping threads / cores while more instances step than the cores hold. None
    # (and no fitted contention): each instance has its own device.
    host_cores: float | None = arg(None, "instances share this many CPU cores (default: the cost model's fitted "
                                   "contention, or each instance has its own device)")
    threads_per_instance: int = arg(1, "CPU threads of each instance (with --host-cores)")
    seed: int = arg(0, "seed of the simulated sampled tokens and step-time draws")
    step_noise: bool = arg(True, "draw each step's time from the spread the cost model was fitted with "
                           "(a fitted cost's step_noise; none: the formula's time)", flags=("--step-noise",))
    kill: tuple[int, float] | None = arg(None, "kill instance ID at time T seconds: ID@T", type=_parse_kill)
    # What the router decides after an event (a hand-off, an in-pair move) reaches the instance this much
    # later and, as in EngineInstance's loop, is carried out before its next step, not inside the one running.
    # 0 for both: decisions taken by the instance itself at the step boundary (AcceLLM's design; what-if).
    router_latency: float = arg(0.001, "seconds a router's message takes to reach an instance (0: the instance "
                                "decides itself, before its next step)")
    rebalance_every: float = arg(REBALANCE_EVERY, "seconds between the router's in-pair rebalancing rounds "
                                 "(accellm; 0: a round at every step's end)")
    move_cooldown: float = arg(MOVE_COOLDOWN, "seconds a request moved within a pair stays put (the router's "
                               "damping of decisions on stale snapshots)")
    policy_options: dict = field(default_factory=dict)

def prefix_match(bm: BlockManager, token_ids) -> int:
    """Tokens of `token_ids` whose blocks bm's prefix cache holds (read-only; match_prefix's walk)."""
    if not bm.enable_prefix_caching:
        return 0
    return len(bm.cached_blocks(token_ids, (len(token_ids) - 1) // bm.block_size)) * bm.block_size


class SimInstance:
    def __init__(self, iid: int, role: Role, cfg: SimConfig, kv_bytes_per_block: int, pair_id: int | None):
        self.iid, self.role, self.pair_id = iid, role, pair_id
        self.bm = BlockManager(cfg.num_blocks + 1, cfg.block_size, cfg.enable_prefix_caching)
        self.sched = Scheduler(self.bm, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.alive = True
        self.plan: SchedulerOutput | None = None
        self.step_epoch = 0  # bumped when it dies, so a step in flight then is discarded
        # processor sharing (a host's cores shared): the step's work left in seconds alone, the rate it
        # runs at since `since`, and a token that retires the step's end event when the rate changes
        self.work_left, self.rate, self.since, self.started, self.token = 0.0, 1.0, 0.0, 0.0, 0
        self.step_share = 1.0
        self.shape: StepShape | None = None  # the running step's shape, for its step sample
        self.replicas: dict[str, Sequence] = {}  # accellm: KV copies it holds but does not decode
        self.incoming: deque[Sequence] = deque()  # moved KV waiting for blocks here
        self.ops: list = []  # the router's messages that arrived during a step: carried out before the next
        self.record = InstanceRecord(iid, role.value, kv_bytes_per_block=kv_bytes_per_block)

    @property
    def busy(self) -> bool:
        return self.plan is not None

    def note_kv(self) -> None:
        self.record.peak_kv_blocks = max(self.record.peak_kv_blocks, self.bm.num_used_blocks)

    def snapshot(self) -> InstanceState:
        s = self.sched
        pre = [q for q in s.running if q.num_computed_tokens < q.num_prompt_tokens] + list(s.waiting)
        return InstanceState(
            self.iid, role=self.role, pair_id=self.pair_id, alive=self.alive, num_running=len(s.running),
            num_waiting=len(s.waiting) + len(self.incoming), num_prefilling=len(pre),
            prefill_tokens=sum(q.num_tokens - q.num_computed_tokens for q in pre),
            free_blocks=self.bm.num_free_blocks, used_blocks=self.bm.num_used_blocks,
            redundant_blocks=sum(len(r.block_table) for r in self.replicas.values()), block_size=self.bm.block_size,
            prefix_match=lambda ids, bm=self.bm: prefix_match(bm, ids))


@dataclass
class SimRequest:
    info: RequestInfo
    record: RequestRecord
    seq: Sequence | None = None  # the copy being decoded (or prefilled, or queued)
    where: int | None = None  # the instance holding `seq`
    replica_on: int | None = None  # accellm: the instance holding the spare copy
    epoch: int = 0  # bumped when it is re-placed, so a transfer in flight for an old placement is ignored
    moved_at: float = -1e9  # when rebalancing last moved it (it then stays put move_cooldown seconds)


ARRIVE, STEP_DONE, KV_ARRIVED, KILL, MESSAGE, REBALANCE, TURN = range(7)


class FleetSim:
    def __init__(self, cfg: SimConfig, cost: CostModel, trace: list[TraceRequest], prompts: list[list[int]]):
        for name in ("router_latency", "rebalance_every", "move_cooldown"):
            if getattr(cfg, name) < 0:
                raise InvalidRequestError(f"{name} must be >= 0 seconds, got {getattr(cfg, name)}")
        self.cfg, self.cost = cfg, cost
        self.policy: RoutingPolicy = make_policy(cfg.policy, **cfg.policy_options)
        roles = self.policy.roles(cfg.num_instances)
        kv_block = cost.kv_bytes_per_token * cfg.block_size
        pairs = self.policy.uses_pairs
        self.instances = [SimInstance(i, r, cfg, kv_block, i // 2 if pairs else None) for i, r in enumerate(roles)]
        self.events: list = []
        self._order = itertools.count()
        self._seq_ids = itertools.count()
        self.rng = random.Random(cfg.seed)
        self.noise_rng = random.Random(cfg.seed + 1)  # apart from the tokens' draws, so those stay as they were
        table = cost.slowdown_table(cfg.policy, cfg.num_instances)
        if not table and cfg.host_cores:
            per = cfg.threads_per_instance / cfg.host_cores
            table = [max(1.0, (k + 1) * per) for k in range(cfg.num_instances)]
        self.slowdown = table  # empty: a device per instance, steps never slow each other
        self.gap = cost.gap_for(cfg.policy, cfg.num_instances)
        self.overhead = cost.overhead_for(cfg.policy, cfg.num_instances)
        self.now = 0.0
        self.steps = 0
        self.requests: dict[str, SimRequest] = {}
        for tr, ids in zip(trace, prompts, strict=True):
            total = -(-(tr.prompt_tokens + tr.output_tokens) // cfg.block_size)
            if total > cfg.num_blocks:
                raise InvalidRequestError(f"{tr.request_id}: {tr.prompt_tokens}+{tr.output_tokens} tokens need "
                                          f"{total} KV blocks; an instance has {cfg.num_blocks}")
            info = RequestInfo(tr.request_id, tuple(ids), tr.output_tokens)
            self.requests[tr.request_id] = SimRequest(info, RequestRecord(tr.request_id, tr.arrival, tr.prompt_tokens))
            self._push(tr.arrival, ARRIVE, tr.request_id)
        if cfg.kill is not None:
            self._push(cfg.kill[1], KILL, cfg.kill[0])
        self.open = len(self.requests)
        if self.policy.uses_pairs and self.requests and cfg.rebalance_every > 0:
            self._push(cfg.rebalance_every, REBALANCE, None)

    # -- the event loop -------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload) -> None:
        heapq.heappush(self.events, (t, next(self._order), kind, payload))

    def run(self) -> FleetResult:
        while self.events:
            self.now, _, kind, payload = heapq.heappop(self.events)
            if kind == ARRIVE:
                self._arrive(self.requests[payload])
            elif kind == STEP_DONE:
                iid, epoch, token = payload
                inst = self.instances[iid]
                if inst.alive and inst.step_epoch == epoch and inst.token == token:  # else: died, or its end moved
                    self._finish_step(inst)
                    self._reshare()
            elif kind == KV_ARRIVED:
                self._kv_arrived(*payload)
            elif kind == MESSAGE:
                self._deliver(*payload)
            elif kind == TURN:
                self._try_start(self.instances[payload])
            elif kind == REBALANCE:
                self._rebalance()
                if self.open and self.events:  # (nothing else left to happen: a round would change nothing)
                    self._push(self.now + self.cfg.rebalance_every, REBALANCE, None)
            else:
                self._kill(self.instances[payload])
                self._reshare()
        return self._result()

    def _send(self, iid: int, action, on_dead=None) -> None:
        """A router's message to instance iid: `action` runs when it arrives, or before that instance's
        next step if it is stepping then; `on_dead` if the instance has died by then."""
        self._push(self.now + self.cfg.router_latency, MESSAGE, (iid, action, on_dead))

    def _deliver(self, iid: int, action, on_dead) -> None:
        inst = self.instances[iid]
        if not inst.alive:
            if on_dead is not None:
                on_dead()
            return
        if inst.busy:
            inst.ops.append(action)
            return
        action()
        self._try_start(inst)

    def _snapshots(self) -> list[InstanceState]:
        return [i.snapshot() for i in self.instances]

    def _new_seq(self, req: SimRequest, tokens: list[int] | None = None) -> Sequence:
        info = req.info
        seq = Sequence(next(self._seq_ids), info.request_id, 0, list(info.prompt_token_ids),
                       SamplingParams(max_tokens=info.max_tokens, ignore_eos=True), arrival_time=req.record.arrival)
        if tokens is not None:
            seq.token_ids = list(tokens)
        return seq

    def _place(self, req: SimRequest, iid: int, tokens: list[int] | None = None) -> None:
        """Queue req (from its prompt, plus any tokens already produced) on instance iid."""
        req.seq, req.where = self._new_seq(req, tokens), iid
        req.record.instances.append(iid)
        self.instances[iid].sched.add(req.seq)
        self._try_start(self.instances[iid])

    def _arrive(self, req: SimRequest) -> None:
        placement = self.policy.route(req.info, self._snapshots())
        if placement.replicate_to is not None:
            rep = self._new_seq(req)
            rep.status = SeqStatus.WAITING
            self.instances[placement.replicate_to].replicas[req.info.request_id] = rep
            req.replica_on = placement.replicate_to
        self._place(req, placement.prefill)

    # -- steps ----------------------------------------------------------------------------------
    def _try_start(self, inst: SimInstance) -> None:
        if inst.busy or not inst.alive:
            return
        while inst.ops:  # the loop's turn: messages that came during the step first
            inst.ops.pop(0)()
            if inst.busy or not inst.alive:
                return
        self._adopt_incoming(inst)
        self._make_room(inst)
        plan = inst.sched.schedule()
        if not plan.scheduled:
            return
        inst.note_kv()
        shape = StepShape.of_plan(plan.scheduled)
        dt = self.cost.step_time(shape) * self.cost.speed + self.overhead
        if self.cfg.step_noise:
            dt *= self.cost.noise_factor(self.noise_rng.random(), self.cfg.policy, self.cfg.num_instances,
                                         prefill=shape.prefill_tokens > 0)
        inst.plan, inst.shape = plan, shape
        inst.record.steps += 1
        inst.work_left, inst.since, inst.started = dt + self.gap, self.now, self.now
        inst.step_share = dt / inst.work_left if inst.work_left > 0 else 1.0  # the gap is not a step's time
        if self.slowdown:
            self._reshare()
        else:
            inst.token += 1
            self._push(self.now + inst.work_left, STEP_DONE, (inst.iid, inst.step_epoch, inst.token))

    def _reshare(self) -> None:
        """Processor sharing of one host's cores: every stepping instance runs at 1/slowdown[k] while k
        others step; when the number stepping changes, each one's step end moves."""
        if not self.slowdown:
            return
        stepping = [i for i in self.instances if i.busy and i.alive]
        rate = 1.0 / self.slowdown[min(len(stepping) - 1, len(self.slowdown) - 1)] if stepping else 1.0
        for inst in stepping:
            inst.work_left = max(0.0, inst.work_left - (self.now - inst.since) * inst.rate)
            inst.since = self.now
            if inst.rate != rate or inst.started == self.now:
                inst.rate = rate
                inst.token += 1
                self._push(self.now + inst.work_left / rate, STEP_DONE, (inst.iid, inst.step_epoch, inst.token))

    def _finish_step(self, inst: SimInstance) -> None:
        """What LLMEngine.step does with a plan once the model ran, with a made-up token."""
        plan, inst.plan = inst.plan, None
        inst.record.busy_time += (self.now - inst.started) * inst.step_share
        shape = inst.shape
        wall = self.now - inst.started  # the real fleet's format: the step's own time, its start, the gap
        inst.record.step_samples.append([shape.prefill_tokens, shape.prefill_pairs, shape.decode_seqs,
                                         shape.decode_context, wall * inst.step_share, inst.started,
                                         wall * (1.0 - inst.step_share)])
        self.steps += 1
        samples = [it.samples for it in plan.scheduled]
        for it, sampled in zip(plan.scheduled, samples, strict=True):
            seq = it.seq
            seq.num_computed_tokens += it.num_new_tokens
            inst.bm.commit(seq)
            req = self.requests[seq.request_id]
            if sampled:
                seq.token_ids.append(self.rng.randrange(10, 30000))
                req.record.token_times.append(self.now)
                if seq.num_output_tokens >= seq.params.max_tokens:
                    inst.sched.finish(seq, "length")
                    self._complete(req)
                    continue
            self._sync_replica(req)
            if sampled and seq.num_output_tokens == 1:
                self._handoff(req, inst)
        if self.policy.uses_pairs and self.cfg.rebalance_every <= 0:
            self._rebalance()
        # the instance's next turn, after any message sent at this instant (router_latency 0: a decision
        # taken at this step boundary is carried out before the next step)
        self._push(self.now, TURN, inst.iid)

    def _complete(self, req: SimRequest) -> None:
        self.open -= 1
        req.record.completions += 1
        req.record.finish = self.now
        if req.replica_on is not None:
            self._drop_replica(req)
        req.seq = req.where = None

    # -- KV that moves --------------------------------------------------------------------------
    def _handoff(self, req: SimRequest, inst: SimInstance) -> None:
        """The router hears of the first token and decides where the request decodes; the prefill member
        carries the move out at its next turn (one step later: it stepped again meanwhile)."""
        states = self._snapshots()
        h = self.policy.after_prefill(req.info, inst.iid, states, has_copy=lambda i: self._copy_whole(req, i))
        if h.decode != inst.iid:
            self._send(inst.iid, lambda epoch=req.epoch: self._carry_handoff(req, inst, h, epoch))

    def _carry_handoff(self, req: SimRequest, inst: SimInstance, h, epoch: int) -> None:
        seq = req.seq
        if req.epoch != epoch or req.where != inst.iid or seq is None or seq not in inst.sched.running:
            return  # finished, moved or preempted meanwhile
        inst.sched.running.remove(seq)
        req.epoch += 1
        if h.move_kv:  # pd-split: the KV goes over the link, then the source frees it
            dt = self.cost.kv_transfer_time(seq.num_computed_tokens)
            self._push(self.now + dt, KV_ARRIVED, (req.info.request_id, req.epoch, inst.iid, h.decode, False))
        else:  # accellm: the partner's copy becomes the one decoded, this one the spare
            dt = self.cost.kv_transfer_time(seq.num_computed_tokens) / self.cost.num_layers
            self._push(self.now + dt, KV_ARRIVED, (req.info.request_id, req.epoch, inst.iid, h.decode, True))
        req.where = None

    def _kv_arrived(self, rid: str, epoch: int, src: int, dst: int, swap: bool) -> None:
        req = self.requests[rid]
        if req.epoch != epoch or req.seq is None:
            return
        s, d = self.instances[src], self.instances[dst]
        if not d.alive or (not swap and not s.alive):
            self._recover(req, exclude=(src if not s.alive else dst))
            return
        old = req.seq
        if swap:
            rep = d.replicas.pop(rid, None)
            if rep is None:  # the spare copy was dropped meanwhile: decode where the KV is
                if s.alive:
                    s.sched.running.append(old)
                    req.where = src
                    self._try_start(s)
                else:
                    self._recover(req, exclude=src)
                return
            rep.token_ids.extend(old.token_ids[len(rep.token_ids):])
            if s.alive:
                s.replicas[rid] = old
                req.replica_on = src
            else:
                req.replica_on = None
            self._run_here(req, d, rep)
        else:
            seq = self._new_seq(req, old.token_ids)
            seq.num_computed_tokens = old.num_computed_tokens  # the KV that came over
            s.bm.free_seq(old)  # (which zeroes old's count)
            req.seq, req.where = seq, dst
            req.record.instances.append(dst)
            d.incoming.append(seq)
        self._try_start(d)

    def _run_here(self, req: SimRequest, inst: SimInstance, seq: Sequence) -> None:
        seq.status = SeqStatus.RUNNING
        inst.sched.running.append(seq)
        req.seq, req.where = seq, inst.iid
        req.record.instances.append(inst.iid)

    def _adopt_incoming(self, inst: SimInstance) -> None:
        """KV moved here takes blocks (in arrival order) and joins the running batch."""
        while inst.incoming:
            seq = inst.incoming[0]
            n = seq.num_computed_tokens
            seq.num_computed_tokens = 0
            if not inst.bm.can_allocate(seq, n):
                seq.num_computed_tokens = n
                break
            inst.bm.allocate(seq, n)
            seq.num_computed_tokens = n
            inst.bm.commit(seq)
            inst.incoming.popleft()
            seq.status = SeqStatus.RUNNING
            inst.sched.running.append(seq)
        inst.note_kv()

    def _copy_whole(self, req: SimRequest, iid: int) -> bool:
        rep = self.instances[iid].replicas.get(req.info.request_id) if req.replica_on == iid else None
        return rep is not None and req.seq is not None and rep.num_computed_tokens == req.seq.num_computed_tokens

    def _sync_replica(self, req: SimRequest) -> None:
        """accellm: the rows just computed are sent to the partner's copy (it grows with the original);
        where the partner has no room even after dropping its older spare copies, this copy goes."""
        if req.replica_on is None or req.seq is None:
            return
        part = self.instances[req.replica_on]
        rep = part.replicas[req.info.request_id]
        seq = req.seq
        rep.token_ids.extend(seq.token_ids[len(rep.token_ids):])
        n = seq.num_computed_tokens - rep.num_computed_tokens
        if n <= 0:
            return
        short = part.bm.blocks_needed(rep, n) - part.bm.num_free_blocks
        if short > 0:
            self._drop_copies(part, short, keep=req.info.request_id)
        if not part.bm.can_allocate(rep, n):
            self._drop_replica(req)
            return
        part.bm.allocate(rep, n)
        rep.num_computed_tokens += n
        part.note_kv()

    def _drop_replica(self, req: SimRequest) -> None:
        part = self.instances[req.replica_on]
        rep = part.replicas.pop(req.info.request_id, None)
        if rep is not None:
            part.bm.free_seq(rep)
        req.replica_on = None

    def _drop_copies(self, inst: SimInstance, blocks: int, keep: str | None = None) -> None:
        copies = [CopyInfo(rid, len(r.block_table), True, r.seq_id) for rid, r in inst.replicas.items() if rid != keep]
        for rid in self.policy.copies_to_drop(copies, blocks):
            self._drop_replica(self.requests[rid])

    def _make_room(self, inst: SimInstance) -> None:
        """Under memory pressure, spare copies go before the scheduler would preempt a running sequence."""
        if not inst.replicas:
            return
        bm, budget, need = inst.bm, inst.sched.max_num_batched_tokens, 0
        if bm.num_free_blocks > 2 * (budget // bm.block_size + 1) + len(inst.sched.running):
            return  # cannot be short: the running chunks and the head's take a budget each, plus a block per sequence
        for seq in inst.sched.running:
            need += bm.blocks_needed(seq, min(seq.num_tokens_to_schedule, budget))
        if inst.sched.waiting:
            head = inst.sched.waiting[0]
            need += -(-min(head.num_tokens, budget) // bm.block_size)
        short = need - bm.num_free_blocks
        if short > 0:
            self._drop_copies(inst, short)

    def _rebalance(self) -> None:
        """A rebalancing round (accellm), as the router runs one every rebalance_every seconds: each move
        goes to its source as a message; there the request leaves at the next turn (keeping its K/V as the
        spare copy) and the destination, told in turn, goes on from the copy it holds."""
        for pid in sorted({i.pair_id for i in self.instances}):
            pair = [i for i in self.instances if i.pair_id == pid]
            for mv in self.policy.rebalance([i.snapshot() for i in pair]):
                src, dst = self.instances[mv.src], self.instances[mv.dst]
                if not (src.alive and dst.alive):
                    continue
                movable = [r for r in self.requests.values()
                           if r.where == src.iid and r.seq is not None and r.seq.num_output_tokens >= 1
                           and self._copy_whole(r, dst.iid) and self.now - r.moved_at > self.cfg.move_cooldown]
                for req in movable[:mv.count]:
                    req.moved_at = self.now
                    self._send(src.iid, lambda r=req, a=src, b=dst, w=mv.while_prefilling, e=req.epoch:
                               self._leave(r, a, b, w, e))

    def _leave(self, req: SimRequest, src: SimInstance, dst: SimInstance, while_prefilling: bool, epoch: int) -> None:
        seq = req.seq
        if req.epoch != epoch or req.where != src.iid or seq is None or seq not in src.sched.running:
            return
        if while_prefilling and not any(q.num_computed_tokens < q.num_prompt_tokens
                                        for q in (*src.sched.running, *src.sched.waiting)):
            return  # its prefill is over: the decode stays (EngineInstance's check)
        src.sched.running.remove(seq)
        src.replicas[req.info.request_id] = seq
        req.where, req.replica_on = None, None
        req.epoch += 1
        self._send(dst.iid, lambda e=req.epoch: self._arrive_from_copy(req, src, dst, e),
                   on_dead=lambda e=req.epoch: self._back_to(req, src, e, exclude=dst.iid))

    def _arrive_from_copy(self, req: SimRequest, src: SimInstance, dst: SimInstance, epoch: int) -> None:
        rid = req.info.request_id
        if req.epoch != epoch:
            return  # placed again meanwhile
        rep = dst.replicas.pop(rid, None)
        if rep is None:  # the copy was dropped meanwhile: back where its K/V is
            self._back_to(req, src, epoch, exclude=-1)
            return
        rep.token_ids.extend(req.seq.token_ids[len(rep.token_ids):])
        if src.alive and rid in src.replicas:
            req.replica_on = src.iid
        self._run_here(req, dst, rep)

    def _back_to(self, req: SimRequest, src: SimInstance, epoch: int, exclude: int) -> None:
        """A move whose destination died (or lost its copy): the source's spare copy goes on, or else the
        request runs again elsewhere from its tokens."""
        if req.epoch != epoch:
            return
        spare = src.replicas.pop(req.info.request_id, None) if src.alive else None
        if spare is not None:
            req.replica_on = None
            self._run_here(req, src, spare)
            self._try_start(src)
        else:
            self._recover(req, exclude=exclude)

    # -- faults ---------------------------------------------------------------------------------
    def _kill(self, inst: SimInstance) -> None:
        inst.alive = False
        inst.step_epoch += 1
        inst.plan = None
        lost = [r for r in self.requests.values() if r.seq is not None and r.where == inst.iid]
        for r in self.requests.values():  # its spare copies are gone
            if r.replica_on == inst.iid:
                r.replica_on = None
        inst.replicas.clear()
        inst.incoming.clear()
        inst.ops.clear()
        states = self._snapshots()
        plan = self.policy.on_death(inst.iid, [r.info for r in lost], states,
                                    has_copy=lambda rid, i: self._copy_whole(self.requests[rid], i))
        for r in lost:
            rec = plan[r.info.request_id]
            r.epoch += 1
            if rec.from_copy:
                part = self.instances[rec.instance]
                rep = part.replicas.pop(r.info.request_id)
                rep.token_ids.extend(r.seq.token_ids[len(rep.token_ids):])
                r.replica_on = None
                self._run_here(r, part, rep)
                self._try_start(part)
            else:
                if r.replica_on is not None:
                    self._drop_replica(r)
                self._place(r, rec.instance, r.seq.token_ids)

    def _recover(self, req: SimRequest, exclude: int) -> None:
        """A move whose end died: run the request again elsewhere from its tokens so far."""
        tokens = req.seq.token_ids
        if req.replica_on is not None:
            self._drop_replica(req)
        req.epoch += 1
        live = [s for s in self._snapshots() if s.instance_id != exclude]
        self._place(req, self.policy.route(req.info, live).prefill, tokens)

    def _result(self) -> FleetResult:
        span = max((r.record.finish or 0.0) for r in self.requests.values()) - min(
            r.record.arrival for r in self.requests.values()) if self.requests else 0.0
        for inst in self.instances:
            inst.record.span = span
        return FleetResult(self.cfg.policy, self.cfg.num_instances, "sim", [r.record for r in self.requests.values()],
                           [i.record for i in self.instances], {"sim_steps": self.steps})


def simulate(cfg: SimConfig, cost: CostModel, trace: list[TraceRequest], prompts: list[list[int]]) -> FleetResult:
    return FleetSim(cfg, cost, trace, prompts).run()
