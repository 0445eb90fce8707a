"""AsyncEngine: one background thread owns the (thread-unsafe) LLMEngine and steps it continuously.

The asyncio side only enqueues operations (add, abort) and reads published snapshots; the engine
thread applies queued operations between steps, so a new request joins the running batch at the next
step. Outputs go back to each request's asyncio queue through `loop.call_soon_threadsafe`.

Nothing a request does may stop the loop: an add that fails is reported to its caller, and an
exception inside `step()` fails the requests then in the engine (finish_reason "error") while the
loop goes on serving the next ones.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tessera.engine.llm_engine import LLMEngine
from tessera.engine.online_admission import ShortestPromptFirst
from tessera.outputs import RequestOutput
from tessera.sampling_params import SamplingParams

log = logging.getLogger("tessera.serve")


class QueueFullError(Exception):
    """The bounded waiting queue is full (HTTP 429)."""


class ShuttingDownError(Exception):
    """The server is draining or stopped and accepts no new requests (HTTP 503)."""


@dataclass
class _Add:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool
    deliver: Callable[[object], None]  # called in the engine thread; hops to the event loop itself
    accepted: asyncio.Future
    loop: asyncio.AbstractEventLoop
    lora_request: object = None  # a tessera.LoRARequest: the adapter it runs with
    model: str | None = None  # with several models on the engine (tessera.blockllm), the one it runs on


@dataclass
class Snapshot:
    """What the engine thread publishes after every iteration (read by /metrics and admission)."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_hit_rate: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    alive: bool = True


@dataclass
class RequestHandle:
    """The asyncio side of one engine request: outputs arrive on `queue` as (tag, RequestOutput)."""

    request_id: str
    tag: object
    finished: bool = False
    arrival: float = field(default_factory=time.monotonic)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 1024):
        self.engine = engine
        if engine.config.mixed_prefill_tokens:
            # Prompts queue for a capped prefill budget: let the shortest out first (online_admission.py).
            # Not the default: a cap of 512 measured worse at 1 req/s and no better at 4 (docs/benchmarks.md).
            engine.scheduler.policy = ShortestPromptFirst()
        self.max_waiting = max_waiting
        self.snapshot = Snapshot(kv_blocks_total=engine.block_manager.num_blocks)
        self.draining = False
        self._cond = threading.Condition()
        self._ops: list[_Add | tuple[str, str]] = []
        # Adds queued or applied since the last snapshot: the snapshot does not count them yet. They
        # leave this count only when a snapshot that includes them is published, so that admission
        # (and /metrics) never sees a request in neither place.
        self._num_pending_adds = 0
        self._applied_adds = 0  # engine thread only
        self._live: dict[str, _Add] = {}  # engine thread only
        self._open: set[str] = set()  # event-loop thread only: requests added and not yet finished
        self._stop = False
        self._thread: threading.Thread | None = None
        self.step_failures = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tessera-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is left and join the engine thread."""
        self.draining = True
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.snapshot.alive

    @property
    def num_waiting(self) -> int:
        """Requests not running yet: in the scheduler's queue or still on their way to it."""
        with self._cond:
            return self._num_pending_adds + self.snapshot.waiting

    @property
    def num_open(self) -> int:
        return len(self._open)

    async def drain(self, grace: float) -> None:
        """Stop accepting; let open requests finish for up to `grace` seconds, then abort the rest."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self._open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._open:
            log.info("shutdown grace of %.1fs over: aborting %d request(s)", grace, len(self._open))
            for rid in list(self._open):
                self.abort(rid)
            deadline = time.monotonic() + 5.0
            while self._open and time.monotonic() < deadline:
                await asyncio.sleep(0.02)

    # -- requests (event-loop side) -----------------------------------------------------------
    def check_capacity(self, num_requests: int = 1) -> None:
        if self.draining or self._stop:
            raise ShuttingDownError("the server is shutting down and accepts no new requests")
        if not self.alive:
            raise ShuttingDownError("the engine loop is not running")
        waiting = self.num_waiting
        if waiting + num_requests > self.max_waiting:
            raise QueueFullError(
                f"the waiting queue is full ({waiting} waiting, limit {self.max_waiting}); retry later"
            )

    async def add(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        queue: asyncio.Queue,
        tag: object = None,
        stream: bool = True,
        lora_request=None,
        model: str | None = None,
    ) -> RequestHandle:
        """Queues a request for the engine thread and waits until the engine took it (or refused it:
        then the engine's exception is raised here). Outputs are put on `queue` as (tag, output):
        every step the request moved when `stream`, else only the final one."""
        self.check_capacity()
        loop = asyncio.get_running_loop()
        handle = RequestHandle(request_id, tag)

        def on_loop(item: RequestOutput) -> None:  # runs in the event loop
            if item.finished:
                handle.finished = True
                self._open.discard(request_id)
            queue.put_nowait((tag, item))

        def deliver(item: RequestOutput) -> None:  # runs in the engine thread
            try:
                loop.call_soon_threadsafe(on_loop, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        op = _Add(request_id, prompt, prompt_token_ids, params, stream, deliver, loop.create_future(), loop,
                  lora_request, model)
        self._open.add(request_id)
        with self._cond:
            self._ops.append(op)
            self._num_pending_adds += 1
            self._cond.notify()
        try:
            await op.accepted
        except asyncio.CancelledError:  # the client went away while queued: make sure it never runs
            self._open.discard(request_id)
            self.abort(request_id)
            raise
        except Exception:  # the engine refused it
            self._open.discard(request_id)
            raise
        return handle

    def call_in_engine(self, fn: Callable[[], None]) -> None:
        """Run fn in the engine thread at its next turn (changes to engine state from a route)."""
        with self._cond:
            self._ops.append(("call", fn))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent, any time); its KV blocks are freed at the engine's next turn."""
        with self._cond:
            self._ops.append(("abort", request_id))
            self._cond.notify()

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while True:
            try:
                with self._cond:
                    while not self._ops and not eng.has_unfinished_requests() and not self._stop:
                        self._cond.wait()
                    ops, self._ops = self._ops, []
                    stop = self._stop
                for op in ops:
                    self._apply(op)
                if stop:
                    self._abort_all(reason="abort")
                    self._publish()
                    return
                if eng.has_unfinished_requests():
                    steps = eng.stats["steps"]
                    self._step()
                    if eng.stats["steps"] == steps:  # nothing could be scheduled: don't spin
                        with self._cond:
                            if not self._ops:
                                self._cond.wait(0.005)
                self._publish()
            except Exception:  # a bug in this loop itself: keep the server alive, fail what is in flight
                log.exception("engine loop error")
                try:
                    self._abort_all(reason="error", error="internal engine-loop error")
                except Exception:
                    log.exception("cannot clean up after the engine loop error")
                time.sleep(0.01)

    def _apply(self, op) -> None:
        eng = self.engine
        if isinstance(op, _Add):
            self._applied_adds += 1
            try:
                eng.add_request(op.prompt, op.params, request_id=op.request_id, stream=op.stream,
                                prompt_token_ids=op.prompt_token_ids, lora_request=op.lora_request,
                                model=op.model)
            except Exception as e:
                self._resolve(op, e)
                return
            self._live[op.request_id] = op
            self._resolve(op, None)
        elif op[0] == "call":
            try:
                op[1]()
            except Exception:  # a route's change failed; the requests in flight are not its business
                log.exception("engine call failed")
        else:
            _, rid = op
            out = eng.abort(rid) if rid in eng.requests else None
            add = self._live.pop(rid, None)
            if out is not None and add is not None:
                add.deliver(out)

    @staticmethod
    def _resolve(op: _Add, error: Exception | None) -> None:
        def set_result() -> None:
            if op.accepted.done():
                return
            if error is None:
                op.accepted.set_result(None)
            else:
                op.accepted.set_exception(error)

        try:
            op.loop.call_soon_threadsafe(set_result)
        except RuntimeError:
            pass

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            self.step_failures += 1
            log.exception("engine step failed; failing the %d request(s) in flight", len(self._live))
            self._abort_all(reason="error", error=f"engine step failed: {type(e).__name__}: {e}")
            return
        for out in outputs:
            add = self._live.get(out.request_id)
            if add is None:
                continue
            if out.finished:
                del self._live[out.request_id]
            add.deliver(out)

    def _abort_all(self, reason: str, error: str | None = None) -> None:
        eng = self.engine
        for rid in list(eng.requests):
            out = eng.abort(rid)
            add = self._live.pop(rid, None)
            if out is None or add is None:
                continue
            if reason != "abort":
                for c in out.outputs:
                    if c.finish_reason == "abort":
                        c.finish_reason = reason
                out.error = error
            add.deliver(out)
        for rid, add in list(self._live.items()):  # not in the engine any more (should not happen)
            del self._live[rid]
            add.deliver(RequestOutput(rid, None, [], [], finished=True, error=error or reason))

    def _publish(self) -> None:
        eng = self.engine
        sched, bm = eng.scheduler, eng.block_manager
        running = {s.request_id for s in sched.running}
        waiting = {s.request_id for s in sched.waiting} - running
        snapshot = Snapshot(
            running=len(running),
            waiting=len(waiting),
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_blocks,
            prefix_hit_rate=bm.prefix_hit_rate,
            prompt_tokens=eng.stats["prompt_tokens"],
            generation_tokens=eng.stats["generation_tokens"],
            steps=eng.stats["steps"],
            alive=True,
        )
        with self._cond:
            self.snapshot = snapshot
            self._num_pending_adds -= self._applied_adds
        self._applied_adds = 0
