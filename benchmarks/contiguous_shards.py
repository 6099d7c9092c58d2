"""`torchrun ... benchmarks/contiguous_shards.py batch-predict ...`: resnext's CLI with the images
cut into world-size contiguous ranges instead of dealt out a batch at a time, for
bench_predict.py's sharding rows (the only difference between its two torchrun commands)."""

from __future__ import annotations

import sys
from typing import Sequence, TypeVar

from resnext_cli.cli import main
from resnext_cli.commands import predict
from resnext_cli.model.distributed import DistContext

T = TypeVar("T")


def contiguous(items: Sequence[T], ctx: DistContext, block: int = 1) -> list[T]:
    """Rank r takes the r-th of world_size ranges (sizes differing by at most one)."""
    size, extra = divmod(len(items), ctx.world_size)
    start = ctx.rank * size + min(ctx.rank, extra)
    return list(items[start : start + size + (ctx.rank < extra)])


if __name__ == "__main__":
    predict.shard = contiguous  # type: ignore[assignment]
    main(sys.argv[1:])
