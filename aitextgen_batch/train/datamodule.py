"""`TokenDataModule`: each DDP rank reads only its own shards of a token cache, with a per-rank seeded sampler.

Batch b of a rank is `sampler.batch(b * batch_size, batch_size)`, a pure function of (seed + rank, b), so a run
resumed at step s starts at batch `s * gradient_accumulation` and sees exactly the batches it would have seen.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..data import TokenDataset
from .flavor import pl


class BatchStream(IterableDataset):
    """Endless batches start, start+1, ... of a sampler, as dicts of int64 tensors."""

    def __init__(self, sampler, batch_size: int, start: int = 0):
        self.sampler, self.batch_size, self.start = sampler, batch_size, start

    def __iter__(self):
        b = self.start
        while True:
            batch = self.sampler.batch(b * self.batch_size, self.batch_size)
            yield {k: torch.from_numpy(v) for k, v in batch.items()}
            b += 1


class TokenDataModule(pl.LightningDataModule):
    """Training batches of one rank. Rank and world size come from the Trainer (Ray sets them under Ray Train).

    Args:
        cache: token cache folder.
        block_size: tokens per sequence.
        batch_size: sequences per micro-batch on this rank.
        seed: the run's seed; rank r samples with `seed + r`.
        start_batch: micro-batches this rank already trained on (a resumed run).
    """

    def __init__(self, cache, block_size: int, batch_size: int, seed: int = 0, start_batch: int = 0):
        super().__init__()
        self.cache, self.block_size, self.batch_size = cache, block_size, batch_size
        self.seed, self.start_batch = seed, start_batch
        self.shards: list[int] = []
        self.sampler = None

    def setup(self, stage: str | None = None) -> None:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        ds = TokenDataset(self.cache, verify=False)  # each shard's checksum is checked as this rank loads it
        self.shards = ds.shards_for_rank(rank, world)
        self.sampler = ds.sampler(self.block_size, seed=self.seed + rank, shards=self.shards)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(BatchStream(self.sampler, self.batch_size, self.start_batch), batch_size=None)
