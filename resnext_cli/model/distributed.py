"""Multi-process training and inference under torchrun: process group, sharding and reductions.

One process per GPU (NCCL) or per CPU share (gloo). `--batch-size` is per process, so the global
batch is batch_size x world size; `--lr` is used as given, not rescaled. Inference (batch-predict,
evaluate) deals the sorted images out to the processes a batch at a time (`shard`).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

from resnext_cli.errors import UserError

T = TypeVar("T")
# inference waits at its end for the slowest process: longer than torch's 30-minute default
INFERENCE_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_name: str, timeout: datetime.timedelta | None = None) -> DistContext:
    """Join the process group torchrun describes in the environment; a no-op without it.
    `timeout`: how long a collective may wait for the other processes (torch's default: 30 min)."""
    if not launched_by_torchrun():
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s): start at "
                "most one process per GPU (--nproc_per_node)."
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def process_device(ctx: DistContext, requested: str) -> str:
    """Under torchrun each process takes the GPU of its local rank."""
    if ctx.enabled and requested in ("auto", "cuda"):
        if torch.cuda.is_available():
            return f"cuda:{ctx.local_rank}"
        return "cpu" if requested == "auto" else requested
    return requested


def all_reduce_sums(ctx: DistContext, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over all processes (counts, loss sums), in float64."""
    if not ctx.enabled:
        return values
    reduce_device = device if device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=reduce_device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def average_gradients(ctx: DistContext, parameters: list[torch.nn.Parameter]) -> None:
    """Mean of each gradient over processes: for the frozen phase, where only the small head
    trains and DDP's bucketing would buy nothing."""
    if not ctx.enabled:
        return
    for param in parameters:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad.div_(ctx.world_size)


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], ctx: DistContext, block: int = 1) -> list[T]:
    """This process's share of a sorted list: blocks of `block` consecutive items (a batch)
    dealt round-robin, block b to rank b % world_size. Whole batches keep every image in the
    batch it has in one process, so the results are those of one process to the bit (a batch of
    other images can change the last bits of a float32 result); dealing them out rather than
    cutting the list into world_size ranges keeps the processes equally busy when sorted files
    cluster by size (measured in docs/benchmarks.md)."""
    if not ctx.enabled:
        return list(items)
    step = block * ctx.world_size
    return [item for start in range(ctx.rank * block, len(items), step) for item in items[start : start + block]]


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (pickled; for small summaries, not tensors)."""
    if not ctx.enabled:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def check_same_items(ctx: DistContext, items: Sequence[str], what: str) -> None:
    """Every process must have listed the same files, or the shards would overlap or leave gaps
    (one folder seen through different mounts, files added while the processes started)."""
    if not ctx.enabled:
        return
    digest = hashlib.sha256("\0".join(items).encode("utf-8", "surrogateescape")).hexdigest()
    seen = gather_objects(ctx, (len(items), digest))
    if len(set(seen)) > 1:
        counts = ", ".join(f"rank {rank}: {count}" for rank, (count, _) in enumerate(seen))
        raise UserError(
            f"The processes do not see the same files in {what} ({counts} files, or other names). "
            "Give every process the same folder (a shared file system on every node), and do not "
            "change it while batch-predict starts."
        )
