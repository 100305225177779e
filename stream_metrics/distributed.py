"""Ranks, and the one collective a row costs.

Works with ``torch.distributed`` alone (torchrun, accelerate launch and DeepSpeed all set it up).
Before the process group exists, the launcher's environment (RANK, WORLD_SIZE) tells the rank, so
that only the main process creates runs even when stream_metrics starts first.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if _active() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def main_process_only(fn):
    """Run ``fn`` on the main process; elsewhere return None. Backends are touched through this only."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main() else None
    return wrapper


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather(fields: dict) -> list[dict]:
    """Every rank's ``fields`` (numbers or 0-d tensors), as host numbers, in rank order.

    This is the row's synchronisation point: one all_gather where several processes run, and the
    one wait for the device (``tolist``) everywhere.
    """
    names = list(fields)
    if not (_active() and world_size() > 1):
        # One process: only the device counts need reading, all of them in one stack.
        on_device = [name for name in names if isinstance(fields[name], torch.Tensor)]
        values = dict(fields)
        if on_device:
            device = fields[on_device[0]].device
            stacked = torch.stack([fields[n].to(device=device, dtype=torch.float64) for n in on_device])
            values.update(zip(on_device, stacked.tolist()))  # host sync: the row's one wait
        return [values]
    device = _collective_device()
    vector = torch.stack([
        value.to(device=device, dtype=torch.float64) if isinstance(value, torch.Tensor)
        else torch.tensor(float(value), dtype=torch.float64, device=device)
        for value in fields.values()
    ])
    out = [torch.empty_like(vector) for _ in range(world_size())]
    dist.all_gather(out, vector)  # the row's one collective
    return [dict(zip(names, row)) for row in torch.stack(out).tolist()]  # host sync: the row's one wait


def distinct_devices() -> int:
    """The devices that do distinct work (read different data): ``throughput/tokens_per_s_per_device``
    divides by this. Every rank, for pure data parallelism."""
    return world_size()
