"""Process groups: the compute group (gloo on CPU, NCCL on GPU) and a gloo control group for the step
broadcast.

A worker waits on the control group between steps for as long as rank 0 is idle, so that group's timeout
is long; the compute group's timeout (EngineConfig.distributed_timeout_s) bounds every collective inside
a step. A rank that dies closes its sockets, and the others' pending operations fail at once; the
timeouts catch a rank that hangs alive.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tessera.errors import DistributedError

_IDLE_TIMEOUT = timedelta(days=7)  # a worker waiting for rank 0's next step


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    control: object  # the gloo ProcessGroup of the step broadcast

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def broadcast(self, message=None):
        """Rank 0 sends `message` (any picklable object; tensors on the CPU) to every rank; every rank
        returns it."""
        box = [message]
        try:
            dist.broadcast_object_list(box, src=0, group=self.control)
        except (RuntimeError, dist.DistBackendError) as e:
            raise DistributedError(f"rank {self.rank}: the step broadcast failed ({e}); a rank has died") from e
        return box[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when this process was started by torchrun (its environment), else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def init_distributed(rank: int, world_size: int, device_type: str, timeout_s: float,
                     init_method: str | None = None) -> DistContext:
    """Join the process group (init_method None: torchrun's env://). On CUDA each rank takes
    cuda:<local rank>."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    try:
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        control = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    except (RuntimeError, ValueError, dist.DistStoreError) as e:
        raise DistributedError(f"rank {rank} of {world_size} could not join the process group: {e}") from e
    return DistContext(rank, world_size, device, control)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
