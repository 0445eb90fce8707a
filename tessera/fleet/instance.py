"""EngineInstance: one LLMEngine of a fleet, stepped by its own thread; a Ray actor, or an object in this
process (tests). The router drives it through a few queued calls and one poll.

Besides running requests it moves them (tessera.engine.migration):
- `submit(..., replicate_to=j)`: after every step the K/V rows the request gained are sent to instance
  j, which keeps them as a redundant copy (AcceLLM: the prefill member streams its KV to the partner);
- `move(rid, dst, move_kv, keep_copy)`: stop running a request here and have `dst` go on with it, with
  its K/V shipped (pd-split), or from the copy `dst` already holds while this instance keeps its own
  (accellm; `dst` then sends its new rows back, so both copies stay whole);
- `adopt(state, from_copy, replicate_to)`: go on with a request started elsewhere;
- redundant copies are the first thing dropped when the pool runs short (the policy says which).
Events (outputs, prefill done, moved) and a snapshot of the instance's state come back through `poll`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from tessera.config import EngineConfig
from tessera.engine.migration import KVCopy, SeqState, read_kv
from tessera.errors import InvalidRequestError
from tessera.fleet.layer_stream import LayerStreamer
from tessera.fleet.policies import CopyInfo, make_policy

log = logging.getLogger("tessera.fleet")


@dataclass
class InstanceSnapshot:
    """What a poll returns besides events: the fields of policies.InstanceState, and the copies held."""

    instance_id: int
    num_running: int = 0
    num_waiting: int = 0
    num_prefilling: int = 0
    prefill_tokens: int = 0  # prompt tokens the prefilling sequences still have to compute
    free_blocks: int = 0
    used_blocks: int = 0
    redundant_blocks: int = 0
    copies: dict[str, int] = field(default_factory=dict)  # request id -> K/V rows held as a redundant copy
    requests: list[str] = field(default_factory=list)  # the requests it runs
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, found
    busy_time: float = 0.0
    peak_used_blocks: int = 0
    copies_dropped: int = 0  # redundant copies given up under memory pressure
    adopted_with_kv: int = 0  # requests taken over with their K/V (moved, or a copy held here)
    adopted_recomputed: int = 0  # requests taken over without K/V: recomputed from their tokens
    layer_streamed_chunks: int = 0  # prefill chunks whose K/V went to the partner layer by layer
    # submits taken in so far and their prompt tokens: the router counts what it sent, and what is sent but
    # not yet taken in is load this snapshot does not show (a step can hold the next submit for 250 ms)
    submitted: int = 0
    submitted_tokens: int = 0
    failed: str | None = None  # the engine loop's error, when a step raised


@dataclass
class _Replication:
    peer: int
    sent: int = 0  # rows sent so far
    layer_sent: int = 0  # rows the running step's chunk sent layer by layer (layer_stream)


class EngineInstance:
    def __init__(self, instance_id: int, config: EngineConfig, policy: str = "least-loaded"):
        from tessera.engine.llm_engine import LLMEngine

        self.instance_id = instance_id
        self.engine = LLMEngine(config, progress=False)
        self.policy = make_policy(policy)  # only its pure copies_to_drop is used here
        # AcceLLM pairs: prefill chunks reach the partner layer by layer (tessera.fleet.layer_stream)
        self.streamer = LayerStreamer(self) if self.policy.uses_pairs else None
        self.peers: dict[int, object] = {}  # instance id -> handle (tessera.fleet.handles)
        self.copies: dict[str, KVCopy] = {}
        self.copy_last_step: dict[str, int] = {}
        self.dropped: set[str] = set()  # copies dropped under pressure: later rows for them are ignored
        self.replicating: dict[str, _Replication] = {}
        self.report_prefill: set[str] = set()
        self.dead = False
        self._ops: list[tuple] = []
        self._events: list[tuple] = []
        self._cond = threading.Condition()
        self.lock = threading.Lock()  # held by the engine thread through each turn (ops, step, snapshot)
        self._snapshot = InstanceSnapshot(instance_id)
        self._busy = 0.0
        self._peak = 0
        self._num_dropped = 0
        self._adopted = [0, 0]  # with K/V, recomputed
        self._submitted = [0, 0]  # submits taken in, their prompt tokens
        self._failed: str | None = None
        self._stop = False
        self._hold: tuple[str, int] | None = None  # hold_at's (request id, output tokens)
        self._held = False
        from tessera.fleet.fit import PlanWatcher

        self._plans = PlanWatcher(self.engine)  # each step's shape, timed beside it (the simulator's cost fit)
        self._step_samples: list[list[float]] = []
        self._thread = threading.Thread(target=self._run, name=f"tessera-instance-{instance_id}", daemon=True)
        self._thread.start()

    # -- calls (any thread) ------------------------------------------------------------------------
    def info(self) -> dict:
        eng = self.engine
        from tessera.engine.model_runner import ModelRunner

        return {"num_blocks": eng.block_manager.num_blocks, "block_size": eng.config.block_size,
                "kv_bytes_per_block": ModelRunner.kv_bytes_per_block(eng.model_config, eng.config.block_size,
                                                                     eng.dtype),
                "max_model_len": eng.max_model_len, "pid": os.getpid()}

    def connect(self, peers: dict[int, object]) -> None:
        self.peers = dict(peers)

    def submit(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params,
               replicate_to: int | None = None, report_prefill: bool = False) -> None:
        self._queue(("submit", request_id, prompt, prompt_token_ids, params, replicate_to, report_prefill))

    def move(self, request_id: str, dst: int, move_kv: bool, keep_copy: bool, while_prefilling: bool = False) -> None:
        """while_prefilling: only if this instance still has prompt work when the move is carried out (the
        router decided it on a snapshot a poll old; a prefill done since leaves nothing to move away from)."""
        self._queue(("move", request_id, dst, move_kv, keep_copy, while_prefilling))

    def adopt(self, state: SeqState, from_copy: bool = False, replicate_to: int | None = None) -> None:
        """Go on with a request started elsewhere. from_copy: the sender expects the copy held here to be
        used (any copy held is used when its tokens match, and dropped otherwise)."""
        self._queue(("adopt", state, from_copy, replicate_to))

    def copy_rows_many(self, items: list[tuple]) -> None:
        """Several requests' rows, (request id, token ids, start, rows) each: what one step sends a peer, in
        one message (a Ray call per request and step cost more than the rows)."""
        with self._cond:
            self._ops.extend(("copy_rows", rid, ids, start, rows, None) for rid, ids, start, rows in items)
            self._cond.notify_all()

    def copy_layer_rows(self, request_id: str, token_ids: list[int], layer: int, start: int, rows) -> None:
        self._queue(("copy_rows", request_id, token_ids, start, rows, layer))

    def drop_copy(self, request_id: str) -> None:
        self._queue(("drop_copy", request_id))

    def abort(self, request_id: str) -> None:
        self._queue(("abort", request_id))

    def kv_of(self, request_id: str) -> dict:
        """How many K/V rows of a request this instance holds: running it, and as a redundant copy."""
        with self.lock:
            req = self.engine.requests.get(request_id)
            copy = self.copies.get(request_id)
            return {"running": req.seqs[0].num_computed_tokens if req is not None else None,
                    "copy": copy.num_rows if copy is not None else None}

    def hold_at(self, request_id: str, num_tokens: int) -> None:
        """A test hook: once `request_id` has `num_tokens` output tokens here, this instance stops stepping
        (its calls still answer, its ops wait) until `release()` or a kill. A test then acts on the stream
        at a known point, whatever the machine's speed, instead of racing the engine with a sleep."""
        with self._cond:
            self._hold = (request_id, num_tokens)

    def release(self) -> None:
        with self._cond:
            self._hold, self._held = None, False
            self._cond.notify_all()

    def step_samples(self) -> list[list[float]]:
        """Every step timed so far: [prefill tokens, prefill pairs, decode seqs, decode context, seconds,
        start (time.time()), seconds of the loop outside the step (ops applied, replication sent)]."""
        with self.lock:
            return list(self._step_samples)

    def poll(self, timeout: float = 0.05) -> tuple[list[tuple], InstanceSnapshot]:
        """Events since the last poll (waiting up to `timeout` for one) and the latest snapshot."""
        with self._cond:
            if not self._events and not self.dead:
                self._cond.wait(timeout)
            events, self._events = self._events, []
            return events, self._snapshot

    def kill(self) -> None:
        """Die at once, as a crash would (tests: the fake actor's version of ray.kill)."""
        self.dead = True
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(10)

    # -- the engine thread -------------------------------------------------------------------------
    def _queue(self, op: tuple) -> None:
        with self._cond:
            self._ops.append(op)
            self._cond.notify_all()

    def _emit(self, *event) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cond:
                while not self._ops and not eng.has_unfinished_requests() and not self._stop:
                    self._cond.wait()
                ops, self._ops = self._ops, []
                if self._stop:
                    return
            with self.lock:
                try:
                    t_ops = time.perf_counter()
                    for op in ops:
                        self._apply(op)
                    if eng.has_unfinished_requests():
                        self._relieve_pressure()
                        t0 = time.perf_counter()
                        start = time.time()  # one clock for every instance of the host: steps' overlap
                        outputs = eng.step()
                        dt = time.perf_counter() - t0
                        self._busy += dt
                        self._after_step(outputs)
                        if self._plans.shapes:
                            shape = self._plans.shapes.pop()
                            self._plans.shapes.clear()
                            if shape.prefill_tokens + shape.decode_seqs:
                                # the loop's time outside the step (ops before it, replication and events
                                # after it) is the instance's too, and the simulator's overhead term
                                self._step_samples.append([shape.prefill_tokens, shape.prefill_pairs,
                                                           shape.decode_seqs, shape.decode_context, dt, start,
                                                           time.perf_counter() - t_ops - dt])
                except Exception as e:  # a broken engine is a dead instance: the router recovers its requests
                    log.exception("instance %d failed", self.instance_id)
                    self._failed = f"{type(e).__name__}: {e}"
                    self.kill()
                self._publish()
            with self._cond:  # hold_at: stopped after the step that reached the mark, until released
                while self._held and not self._stop:
                    self._cond.wait()

    def _apply(self, op: tuple) -> None:
        eng, kind = self.engine, op[0]
        if kind == "submit":
            _, rid, prompt, ids, params, replicate_to, report = op
            self._submitted[0] += 1
            self._submitted[1] += len(ids)
            try:
                eng.add_request(prompt, params, request_id=rid, stream=True, prompt_token_ids=ids)
            except Exception as e:  # the router checked it; an instance that still refuses says why
                self._emit("error", rid, f"{type(e).__name__}: {e}")
                return
            if replicate_to is not None and replicate_to in self.peers:
                self.replicating[rid] = _Replication(replicate_to)
            if report:
                self.report_prefill.add(rid)
        elif kind == "move":
            _, rid, dst, move_kv, keep_copy, while_prefilling = op
            if rid not in eng.requests or dst not in self.peers:
                return  # finished (or aborted) meanwhile
            sched = eng.scheduler
            if while_prefilling and not any(s.num_computed_tokens < s.num_prompt_tokens
                                            for s in (*sched.running, *sched.waiting)):
                return  # its prefill is over: the decode stays
            try:
                state = eng.export_request(rid, with_kv=move_kv)
            except InvalidRequestError as e:  # a request that cannot move goes on here
                log.warning("instance %d: %s", self.instance_id, e)
                return
            copy = eng.detach_request(rid, keep_kv=keep_copy)
            self.replicating.pop(rid, None)
            self.report_prefill.discard(rid)
            if copy is not None:
                self._keep_copy(copy)
            self.peers[dst].send("adopt", state, not move_kv, self.instance_id if keep_copy else None)
            self._emit("moved", rid, dst)
        elif kind == "adopt":
            _, state, from_copy, replicate_to = op
            rid = state.request_id
            if rid in eng.requests:  # it moved here before the router learnt of it: already going on
                return
            # a copy held here is used whenever its tokens match (from_copy or not: the router's picture
            # may be older than the copy), and never left behind
            copy = self.copies.pop(rid, None)
            self.copy_last_step.pop(rid, None)
            self.dropped.discard(rid)
            try:
                eng.adopt_request(state, copy)
            except Exception as e:
                self._emit("error", rid, f"{type(e).__name__}: {e}")
                return
            finally:
                if copy is not None and copy.block_table:  # not taken over (its tokens did not match)
                    copy.release(eng.block_manager)
            seq = eng.requests[rid].seqs[0]
            self._adopted[seq.num_computed_tokens == 0] += 1
            if replicate_to is not None and replicate_to in self.peers:
                self.replicating[rid] = _Replication(replicate_to, seq.num_computed_tokens if copy else 0)
            self._emit("adopted", rid)
        elif kind == "copy_rows":
            _, rid, token_ids, start, rows, layer = op
            copy = self.copies.get(rid)
            if copy is None:
                if start or layer or rid in self.dropped or rid in eng.requests:
                    return
                copy = KVCopy(rid, list(token_ids))

            def extend() -> bool:
                if layer is None:
                    return copy.extend(eng.block_manager, eng.runner.kv_cache, token_ids, start, rows)
                return copy.extend_layer(eng.block_manager, eng.runner.kv_cache, token_ids, layer, start, rows)

            try:
                ok = extend()
                if not ok:
                    self._drop_for(rows.shape[-3] // eng.config.block_size + 1, keep=rid)
                    ok = extend()
            except ValueError:  # rows that do not follow (an earlier part was lost): the copy is no good
                log.warning("instance %d: dropping the copy of %s: %s", self.instance_id, rid, "rows out of order")
                ok = False
            if not ok:
                self._release_copy(copy)
                self.dropped.add(rid)
                self._num_dropped += 1
                return
            self._keep_copy(copy)
        elif kind == "drop_copy":
            copy = self.copies.get(op[1])
            if copy is not None:
                self._release_copy(copy)
            self.dropped.discard(op[1])
        elif kind == "abort":
            rid = op[1]
            if rid in eng.requests:
                eng.abort(rid)
            self._forget(rid)
            copy = self.copies.get(rid)
            if copy is not None:
                self._release_copy(copy)

    def _keep_copy(self, copy: KVCopy) -> None:
        self.copies[copy.request_id] = copy
        self.copy_last_step[copy.request_id] = self.engine.stats["steps"]

    def _release_copy(self, copy: KVCopy) -> None:
        copy.release(self.engine.block_manager)
        self.copies.pop(copy.request_id, None)
        self.copy_last_step.pop(copy.request_id, None)

    def _forget(self, rid: str) -> None:
        rep = self.replicating.pop(rid, None)
        if rep is not None:
            self.peers[rep.peer].send("drop_copy", rid)
        self.report_prefill.discard(rid)

    def _drop_for(self, blocks_needed: int, keep: str | None = None) -> None:
        infos = [CopyInfo(rid, len(c.block_table), True, self.copy_last_step.get(rid, 0))
                 for rid, c in self.copies.items() if rid != keep]
        for rid in self.policy.copies_to_drop(infos, blocks_needed):
            self._release_copy(self.copies[rid])
            self.dropped.add(rid)
            self._num_dropped += 1

    def _relieve_pressure(self) -> None:
        """Redundant copies go before anything running is preempted: the next step needs about a block
        per running sequence and the head of the queue's prompt."""
        if not self.copies:
            return
        sched, bm = self.engine.scheduler, self.engine.block_manager
        need = len(sched.running) + (-(-sched.waiting[0].num_tokens // bm.block_size) if sched.waiting else 0)
        if bm.num_free_blocks < need:
            self._drop_for(need - bm.num_free_blocks)

    def _after_step(self, outputs) -> None:
        eng = self.engine
        self._peak = max(self._peak, eng.block_manager.num_used_blocks)
        to_send: dict[int, list[tuple]] = {}  # peer -> this step's rows for it
        for rid, rep in list(self.replicating.items()):
            req = eng.requests.get(rid)
            if req is None:
                continue
            seq = req.seqs[0]
            rep.sent, rep.layer_sent = max(rep.sent, rep.layer_sent), 0
            if seq.num_computed_tokens > rep.sent:
                rows = read_kv(eng.runner.kv_cache, seq.block_table, rep.sent, seq.num_computed_tokens)
                to_send.setdefault(rep.peer, []).append((rid, list(seq.token_ids), rep.sent, rows))
                rep.sent = seq.num_computed_tokens
        for peer, items in to_send.items():
            self.peers[peer].send("copy_rows_many", items)
        for out in outputs:
            self._emit("out", out)
            if out.finished:
                self._forget(out.request_id)
            elif (self._hold is not None and out.request_id == self._hold[0]
                  and len(out.outputs[0].token_ids) >= self._hold[1]):
                self._held = True
        for rid in list(self.report_prefill):
            req = eng.requests.get(rid)
            if req is None:
                self.report_prefill.discard(rid)
            elif req.seqs[0].num_output_tokens >= 1:
                self.report_prefill.discard(rid)
                self._emit("prefilled", rid)

    def _publish(self) -> None:
        eng = self.engine
        sched, bm = eng.scheduler, eng.block_manager
        seqs = list(sched.running) + list(sched.waiting)
        snap = InstanceSnapshot(
            self.instance_id, num_running=len(sched.running), num_waiting=len(sched.waiting),
            num_prefilling=sum(s.num_computed_tokens < s.num_prompt_tokens for s in seqs),
            prefill_tokens=sum(max(0, s.num_prompt_tokens - s.num_computed_tokens) for s in seqs),
            free_blocks=bm.num_free_blocks, used_blocks=bm.num_used_blocks,
            redundant_blocks=sum(len(c.block_table) for c in self.copies.values()),
            copies={rid: c.num_rows for rid, c in self.copies.items()}, requests=list(eng.requests),
            steps=eng.stats["steps"], prompt_tokens=eng.stats["prompt_tokens"],
            generation_tokens=eng.stats["generation_tokens"], prefix_queries=bm.prefix_queries,
            prefix_hits=bm.prefix_hits, busy_time=self._busy, peak_used_blocks=self._peak,
            copies_dropped=self._num_dropped, adopted_with_kv=self._adopted[0], adopted_recomputed=self._adopted[1],
            layer_streamed_chunks=self.streamer.chunks_sent if self.streamer is not None else 0,
            failed=self._failed, submitted=self._submitted[0], submitted_tokens=self._submitted[1])
        with self._cond:
            self._snapshot = snap
