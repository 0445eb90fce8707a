"""Starting the ranks of a parallel engine, watching them, and stopping them.

The engine process is rank 0: it owns the scheduler and the sampler. Ranks 1..N-1 are worker processes
it spawns (torch.multiprocessing, the spawn method), or, when the script was launched by torchrun, the
other torchrun processes: there `LLM(...)` on a rank other than 0 becomes that rank's worker loop and
the process exits when rank 0 shuts the engine down.

A dead worker is noticed before each step (its process handle) and by the collectives themselves (a
closed socket fails them at once); rank 0 then raises DistributedError and stops the other workers.
A worker whose rank 0 dies fails in its next collective or broadcast and exits, and a watchdog thread
also ends it if its parent process goes away while it is busy elsewhere.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tessera.config import EngineConfig
from tessera.distributed.group import DistContext, destroy, free_port, init_distributed, torchrun_rank
from tessera.errors import DistributedError

log = logging.getLogger("tessera")


def threads_per_rank(config: EngineConfig) -> int:
    """CPU threads each rank uses: the cores shared out, unless num_threads says."""
    return config.num_threads or max(1, (os.cpu_count() or 1) // config.parallel_size)


class EngineRanks:
    """Rank 0's handle on the other ranks of an engine."""

    def __init__(self, ctx: DistContext, config: EngineConfig, processes: list):
        self.ctx = ctx
        self.config = config
        self.processes = processes  # spawned workers (empty under torchrun)
        self.failed: str | None = None

    def check(self) -> None:
        """Raise DistributedError (and stop the others) if a worker has died."""
        if self.failed is None:
            dead = [(k + 1, p) for k, p in enumerate(self.processes) if not p.is_alive()]
            if dead:
                self.failed = ", ".join(f"rank {r} (pid {p.pid}) exited with code {p.exitcode}" for r, p in dead)
        if self.failed is not None:
            self.shutdown()
            raise DistributedError(f"a worker of this {self.ctx.world_size}-rank engine died: {self.failed}; "
                                   "the engine is shut down, start a new one")

    def fail(self, error: Exception) -> DistributedError:
        """A collective failed on rank 0: stop everything, return the error to raise."""
        if self.failed is None:
            self.failed = str(error)
        self.shutdown()
        return error if isinstance(error, DistributedError) else DistributedError(
            f"a collective of this {self.ctx.world_size}-rank engine failed ({error}); a rank died or timed out; "
            "the engine is shut down")

    def prepare_model(self, model):
        from tessera.distributed.worker import prepare_model

        return prepare_model(self.ctx, self.config, model)

    def runner(self, model, num_blocks: int, block_size: int, dtype: torch.dtype):
        """Rank 0's runner; the workers build theirs with the same number of KV blocks."""
        from tessera.distributed.worker import build_runner

        self.ctx.broadcast(("init", num_blocks))
        return build_runner(self, self.config, model, num_blocks, dtype)

    def moe_traffic(self, model) -> dict:
        """Expert parallelism: the bytes every rank's executor sent so far, summed over the ranks, per
        token per MoE layer (tessera.moe.token_flow.traffic_summary)."""
        from tessera.moe.token_flow import traffic_summary

        self.check()
        try:
            self.ctx.broadcast(("traffic",))
            stats = model.executor.stats.summed()
        except (RuntimeError, DistributedError) as e:
            raise self.fail(e) from e
        return traffic_summary(stats, model.executor.tokens, len(model.moe_blocks()))

    def shutdown(self) -> None:
        if getattr(self, "_down", False):
            return
        self._down = True
        if self.failed is None:
            try:
                self.ctx.broadcast(("stop",))
            except DistributedError:
                pass
        for p in self.processes:
            p.join(timeout=10)
        for p in self.processes:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        destroy()


def start_ranks(config: EngineConfig, model_path: Path, max_model_len: int, device_type: str) -> EngineRanks:
    """Rank 0's side: spawn the workers (or join torchrun's ranks) and the process group. On a torchrun
    rank other than 0 this runs that rank's worker and exits the process."""
    world = config.parallel_size
    if torch.distributed.is_initialized():
        raise DistributedError("this process already runs a parallel engine (or another torch.distributed group); "
                               "close() that engine before starting another")
    launched = torchrun_rank()
    if launched is not None:
        rank, size = launched
        if size != world:
            raise DistributedError(f"torchrun started {size} ranks but the engine asks for {world} "
                                   f"(tensor_parallel_size={config.tensor_parallel_size}, "
                                   f"sequence_parallel_size={config.sequence_parallel_size}, "
                                   f"expert_parallel_size={config.expert_parallel_size})")
        if rank != 0:
            code = worker_main(rank, size, None, config, model_path, max_model_len, device_type, None)
            sys.exit(code)
        ctx = init_distributed(0, world, device_type, config.distributed_timeout_s)
        return EngineRanks(ctx, config, [])
    init_method = f"tcp://127.0.0.1:{free_port()}"
    spawn = mp.get_context("spawn")
    procs = [spawn.Process(target=worker_main, name=f"tessera-rank{r}", daemon=True,
                           args=(r, world, init_method, config, model_path, max_model_len, device_type, os.getpid()))
             for r in range(1, world)]
    for p in procs:
        p.start()
    log.info("started %d worker processes (pids %s) for %d ranks", len(procs), [p.pid for p in procs], world)
    try:
        ctx = init_distributed(0, world, device_type, config.distributed_timeout_s, init_method)
    except DistributedError:
        for p in procs:
            p.kill()
        raise
    return EngineRanks(ctx, config, procs)


def _watch_parent(parent_pid: int) -> None:
    """End this worker when its parent (rank 0) is gone, whatever it is blocked in."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            print(f"tessera worker {os.getpid()}: rank 0 (pid {parent_pid}) has exited; exiting", file=sys.stderr)
            os._exit(3)


def worker_main(rank: int, world: int, init_method: str | None, config: EngineConfig, model_path: Path,
                max_model_len: int, device_type: str, parent_pid: int | None) -> int:
    """A worker rank: join the group, load the model (this rank's shard), serve steps until rank 0 says
    stop. Returns the exit code (0 clean, 1 after a DistributedError)."""
    if parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to rank 0, which stops the workers
    torch.set_num_threads(threads_per_rank(config))
    from tessera.distributed.worker import serve

    try:
        ctx = init_distributed(rank, world, device_type, config.distributed_timeout_s, init_method)
        serve(ctx, config, model_path, max_model_len)
    except DistributedError as e:
        print(f"tessera worker rank {rank}: {e}", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - a worker reports what killed it before its rank 0 sees the group fail
        print(f"tessera worker rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr)
        os._exit(1)  # do not wait on a process group the others may still be blocked in
    destroy()
    return 0


def spawn_ranks(fn, world: int, args: tuple = (), timeout_s: float = 120.0) -> list:
    """Run fn(ctx, *args) on `world` freshly spawned CPU ranks (gloo) and return each rank's result, in
    rank order; for tests and benchmarks. Raises DistributedError if a rank fails or runs past
    timeout_s (every rank is killed then)."""
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [spawn.Process(target=_spawned, args=(fn, r, world, init_method, args, results, timeout_s), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DistributedError(f"ranks {sorted(set(range(world)) - set(out))} did not finish in {timeout_s}s")
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except Exception:  # queue.Empty
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in out]
                if dead:
                    time.sleep(0.5)  # its message may still be in the pipe
                    if results.empty():
                        raise DistributedError(f"rank(s) {dead} died without a result") from None
                continue
            if not ok:
                raise DistributedError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world)]


def _spawned(fn, rank, world, init_method, args, results, timeout_s) -> None:
    torch.set_num_threads(1)
    try:
        ctx = init_distributed(rank, world, "cpu", timeout_s, init_method)
        value = fn(ctx, *args)
        results.put((rank, True, value))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))
        return
    destroy()
