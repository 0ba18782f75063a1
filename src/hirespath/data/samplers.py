"""Samplers shared by the DataModules."""

from __future__ import annotations

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler


def evaluation_sampler(dataset) -> UnrepeatedDistributedSampler | None:
    """Under DDP, each rank's share of an evaluation split with no item repeated; None in a single process.

    Lightning's default DDP sampler pads uneven splits by repeating items, which would count them twice in
    gathered predictions and summed metric counts: every evaluation item must be seen exactly once.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() < 2:
        return None
    return UnrepeatedDistributedSampler(
        dataset, num_replicas=torch.distributed.get_world_size(), rank=torch.distributed.get_rank(), shuffle=False
    )
