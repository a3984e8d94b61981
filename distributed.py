"""Data parallelism under PyTorch's own launcher: the process group and what each rank does.

`torchrun --nproc_per_node N train.py ...` starts N copies of train.py with RANK, WORLD_SIZE and
LOCAL_RANK in their environment (README, "More than one machine"). Each copy (a rank) trains on
its own shard of every batch; gradients are averaged by all-reduce (DistributedDataParallel), so
all ranks keep identical weights, and rank 0 alone writes files and prints.

Exactly the single-process step. A batch of B scenes is split into world-size shards; the BC and
CAT-K losses are means over target tokens, and the shards hold different numbers n_r of them. The
single-process loss over the whole batch is

    L = sum_r S_r / N,    S_r = rank r's summed token losses,   N = sum_r n_r,

so rank r divides its sum by N / world (`token_mean`): DDP's average of the ranks' gradients is
then grad L exactly (up to float summation order), whatever the split.

Shards. `shard(indices)` is the DistributedSampler rule applied to one batch: every rank sees the
same indices (the epoch's shuffle comes from a generator seeded identically on every rank), the
list is padded by repeating its first entries up to a multiple of the world size, and rank r takes
entries r, r + world, ... So shards are disjoint and of equal size except for the padding, which
only happens when a batch is not a multiple of the world size (a padded scene counts twice in that
one step). Nothing is dropped.

A single process (no RANK in the environment) never touches torch.distributed: every function
here is then the identity or a no-op, and the numbers are those of a plain run.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def launched() -> bool:
    """True in a process started by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Rank 0 writes checkpoints, logs and tables, and shows progress bars."""
    return rank() == 0


def setup(device_name: str) -> str:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) when launched by it; returns the
    device this rank computes on: `device_name` in a plain run, cuda:LOCAL_RANK on CUDA. Ranks
    other than 0 print nothing (stdout goes to os.devnull; errors still reach stderr)."""
    if not launched() or dist.is_initialized():
        return device_name
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device_name


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def writer_first():
    """Rank 0 runs the block first (e.g. generates and caches a dataset), the others after it
    (reading the cache): no two processes write the same file."""
    if not is_writer():
        barrier()
    yield
    if is_writer():
        barrier()


def wrap(model):
    """The model wrapped in DistributedDataParallel (its gradients are averaged over the ranks in
    backward) under torchrun; the model itself in a plain run. Roll out with the model itself: the
    wrapper only forwards `forward`."""
    if not active():
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# ----- shards ----------------------------------------------------------------------------------
def shard(indices):
    """This rank's part of `indices` (a list or a 1-D tensor, the same on every rank): padded by
    repeating its first entries to a multiple of the world size, then every world-th entry."""
    W = world_size()
    if W == 1:
        return indices
    n = len(indices)
    pad = (-n) % W
    order = list(range(n)) + [i % n for i in range(pad)]
    mine = order[rank()::W]
    return indices[torch.tensor(mine)] if isinstance(indices, torch.Tensor) else [indices[i] for i in mine]


def own(i: int) -> bool:
    """Whether item i of a list every rank walks in the same order is this rank's (round-robin)."""
    return i % world_size() == rank()


# ----- all-reduce -----------------------------------------------------------------------------
def all_sum(x):
    """Sum over the ranks of a tensor (a new tensor) or of a float / list of floats."""
    if not active():
        return x
    if isinstance(x, torch.Tensor):
        y = x.detach().clone()
        dist.all_reduce(y)
        return y
    t = torch.tensor(x, dtype=torch.float64)                                   # [] or [n]
    dist.all_reduce(t)
    return t.tolist()


def all_mean(x):
    """Mean over the ranks of a tensor or of a float / list of floats."""
    s = all_sum(x)
    W = world_size()
    return s / W if isinstance(s, torch.Tensor) else [v / W for v in s] if isinstance(s, list) else s / W


def mean_dict(d: dict) -> dict:
    """{key: mean over the ranks} of a dict of floats."""
    return dict(zip(d, all_mean([float(v) for v in d.values()]))) if active() else d


def nanmean(x) -> float:
    """Mean of the non-NaN entries of tensor x over all ranks (NaN when there are none)."""
    ok = ~x.isnan()                                                            # [...]
    s, n = all_sum([float(x[ok].double().sum()), float(ok.sum())])
    return s / n if n > 0 else float("nan")


def token_mean():
    """Keyword for reference_model's losses: the count of target tokens their mean divides by.
    Plain run: {} (the loss's own count). Under torchrun: this rank's count mapped to the
    all-ranks count / world size, so that DDP's gradient average is the mean over every token."""
    if not active():
        return {}
    return dict(mean_over=lambda n: all_sum(float(n)) / world_size())


def all_reduce_grads(params) -> None:
    """Sum the gradients of `params` over the ranks, in place (each rank's loss already divided
    by the all-ranks count: the sum is the global mean's gradient)."""
    if active():
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)


# ----- gather ---------------------------------------------------------------------------------
def gather(obj) -> list:
    """Every rank's `obj` (any picklable value), in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
