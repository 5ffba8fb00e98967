"""Rank detection and the epoch sampler: the pieces of a multi-process run that need no process group."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from robustexp.distributed import DistEnv, detect
from robustexp.training.trainer import EpochSampler
from robustexp.utils import derive_seed


def test_rank_from_torchrun_then_slurm_then_single_process():
    assert detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}) \
        == DistEnv(1, 2, 1)
    assert detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == DistEnv(5, 8, 1)
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == DistEnv(0, 1, 0)  # one task: no process group
    assert detect({}) == DistEnv() and not DistEnv().enabled and DistEnv().is_main


def test_single_process_order_is_the_seeded_dataloader_shuffle():
    """The sampler reproduces a fresh DataLoader(shuffle=True, generator=seeded) exactly."""
    data = TensorDataset(torch.arange(103))
    sampler = EpochSampler(data, seed=7)
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(derive_seed(7, "shuffle", epoch))
        expected = torch.cat([b[0] for b in DataLoader(data, batch_size=10, shuffle=True, generator=generator)])
        assert list(sampler) == expected.tolist()


def test_ranks_share_out_the_epoch_and_a_resumed_epoch_skips_what_was_seen():
    data = TensorDataset(torch.arange(100))
    shards = []
    for rank in range(4):
        sampler = EpochSampler(data, seed=0, rank=rank, world_size=4)
        sampler.set_epoch(3)
        shards.append(list(sampler))
    assert all(len(s) == 25 for s in shards)
    assert sorted(sum(shards, [])) == list(range(100))  # disjoint and complete
    full = EpochSampler(data, seed=0)
    full.set_epoch(3)
    order = list(full)
    assert shards[1] == order[1::4]
    full.start = 30
    assert list(full) == order[30:] and len(full) == 70
