"""What the pipeline needs from a multi-process run (Lightning DDP; one process per device).

Lightning runs ``train.py`` once per process (it re-launches the script for ranks > 0, or srun / torchrun
start them), so every process executes the whole pipeline. The conventions that keep that correct:

* only global rank 0 writes files (:func:`is_global_zero`; :func:`uqlora.io.atomic_write` checks it), the
  other ranks hold the same state and skip their writes;
* evaluation splits are cut into contiguous, unpadded shards (:class:`ShardSampler`), one per process, and
  the per-process predictions are gathered back in rank order (:func:`all_gather_object`), so every example
  is predicted exactly once and every rank ends with the predictions of the whole split;
* post-hoc statistics that are sums over examples (KFAC factors) are computed on each rank's shard and summed
  with collectives (:func:`uqlora.core.kfac.reduce_kfac`).

Without an initialised process group (the single-process case) every helper is the identity.
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def global_rank() -> int:
    """This process's global rank: the process group's when it is up; before that, Lightning's view (set from
    ``RANK`` / ``LOCAL_RANK`` / ``SLURM_PROCID`` at import and updated by the strategy), else 0."""
    if initialized():
        return dist.get_rank()
    try:
        from lightning.fabric.utilities.rank_zero import rank_zero_only
    except ImportError:  # pragma: no cover - lightning is a dependency
        return 0
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_global_zero() -> bool:
    return global_rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class ShardSampler(DistributedSampler):
    """Indices ``[rank * n // W, (rank + 1) * n // W)``: contiguous, unpadded shards, so each example is seen by
    exactly one rank and concatenating the shards (each put back in data order) in rank order restores the
    data order. (torch's ``DistributedSampler`` pads with repeated examples; Lightning leaves a
    ``DistributedSampler`` in place.) With ``lengths`` the shard is visited longest first (ties in data
    order), as an evaluation loader's :class:`~uqlora.data.datamodule.LengthGroupedSampler` does."""

    def __init__(self, n: int, num_replicas: int, rank: int, lengths=None):  # no super().__init__: no padding
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.n, self.num_replicas, self.rank = int(n), int(num_replicas), int(rank)
        self.start, self.end = self.rank * self.n // self.num_replicas, (self.rank + 1) * self.n // self.num_replicas
        self.num_samples = self.total_size = self.end - self.start
        self.shuffle, self.drop_last, self.seed, self.epoch = False, False, 0, 0
        self.lengths = lengths

    def __iter__(self):
        idx = range(self.start, self.end)
        return iter(idx if self.lengths is None else sorted(idx, key=lambda i: (-self.lengths[i], i)))

    def __len__(self) -> int:
        return self.end - self.start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


def shard_loader(loader: DataLoader, num_replicas: int, rank: int) -> DataLoader:
    """The same (unshuffled) loader over this rank's :class:`ShardSampler` shard of its dataset (grouped by
    length when the loader's sampler was)."""
    lengths = getattr(loader.sampler, "lengths", None)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn,
                      sampler=ShardSampler(len(loader.dataset), num_replicas, rank, lengths),
                      num_workers=loader.num_workers)


def loader_order(loader: DataLoader):
    """The dataset positions in the order the (deterministic) loader visits them."""
    import numpy as np

    return np.fromiter((i for batch in loader.batch_sampler for i in batch), dtype=np.int64)
