"""Which examples each rank sees at each optimizer step.

The order is a pure function of (seed, epoch, step), independent of the parallel layout: the global
batch of step s is the same set of examples whether it is split over 1 rank x 8 or 2 ranks x 4 or
4 micro-batches x 2, which is what makes distributed runs reproduce the 1-process trajectory, and a
resumed run continue exactly where the interrupted one was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GlobalBatchPlan:
    num_examples: int
    global_batch_size: int
    micro_batch_size: int
    dp_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.num_examples < self.global_batch_size:
            raise ValueError(f"the dataset has {self.num_examples} examples, fewer than one global batch "
                             f"({self.global_batch_size}); lower stage.global_batch_size or add data")

    @property
    def steps_per_epoch(self) -> int:
        # The last incomplete global batch of an epoch is dropped: every step sees a full batch.
        return self.num_examples // self.global_batch_size

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def global_batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        # Mixed, not added: seed s epoch 1 must not replay seed s+1 epoch 0.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_examples, generator=generator)
        return order[index * self.global_batch_size:(index + 1) * self.global_batch_size].tolist()

    def micro_batches(self, step: int, dp_rank: int) -> list[list[int]]:
        """This data-parallel rank's contiguous share of the global batch, cut into micro-batches."""
        batch = self.global_batch(step)
        per_rank = self.global_batch_size // self.dp_size
        mine = batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        mbs = self.micro_batch_size
        return [mine[i:i + mbs] for i in range(0, per_rank, mbs)]
