"""The few collective operations the cache writer needs, over accelerate or plain torch.distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


class Ranks:
    """This process's rank among ``world`` processes, with a barrier and an all-reduce max.

    Built from an accelerate ``Accelerator`` (or ``PartialState``) when one is given, else from an initialised
    ``torch.distributed`` process group, else a single process.
    """

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        if accelerator is not None:
            self.rank, self.world = accelerator.process_index, accelerator.num_processes
        elif dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world == 1:
            return
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        else:
            dist.barrier()

    def max(self, value: int) -> int:
        """The largest ``value`` over the processes."""
        if self.world == 1:
            return int(value)
        device = getattr(self.accelerator, "device", None)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor([int(value)], dtype=torch.long, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())


def is_partitioned(model: nn.Module) -> bool:
    """Whether the model's parameters are sharded across processes (DeepSpeed ZeRO-3 or FSDP2), so that every
    forward is a collective all processes must join."""
    return any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in model.parameters())
