"""Start R gloo processes on this machine and collect what each returns, with a deadline (a hung
collective must not hang the caller)."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tessera.errors import TesseraError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args: tuple, out_dir: str, threads: int, timeout: float) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, args: tuple = (), timeout: float = 300.0, threads: int = 1) -> list:
    """Run `fn(rank, world, *args)` in `world` gloo processes (fn must be importable: spawn); returns the
    per-rank results. Raises TesseraError when a rank fails or the deadline passes (all are killed)."""
    with tempfile.TemporaryDirectory(prefix="tessera-ep-") as out_dir:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), fn, args, out_dir, threads, timeout),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TesseraError(f"expert-parallel run on {world} ranks passed its {timeout:.0f}s deadline")
        except mp.ProcessRaisedException as e:
            raise TesseraError(f"an expert-parallel rank failed: {e}") from e
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
