"""What the torchrun workers share: the process group, a byte-level collate, and their reports.

Each worker is launched by tests/test_distributed.py as
``python -m torch.distributed.run --nproc_per_node=2 tests/dist/<worker>.py ...``; every rank
writes what it saw to ``<out>/rank<r>.json`` for the test to read.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import tiny  # noqa: E402  (examples/, put on the path just above)

MAX_LENGTH = 64  # tiny.token_count truncates at the same length


def setup() -> tuple[int, int]:
    """Join the gloo process group torchrun describes in the environment; (rank, world size)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_reduce_coalesced",
               "all_to_all", "all_to_all_single", "barrier", "broadcast", "broadcast_object_list", "gather",
               "gather_object", "monitored_barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor",
               "scatter", "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv")


def count_collectives() -> list[str]:
    """Wrap every collective of torch.distributed with a counter (the real one still runs); the list
    of names called fills as they run. Call it before stream_metrics starts, as a user's import would."""
    import functools

    import torch.distributed.distributed_c10d as c10d

    calls: list[str] = []

    def counted(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    for name in COLLECTIVES:
        if hasattr(c10d, name):
            wrapped = counted(name, getattr(c10d, name))
            setattr(c10d, name, wrapped)
            if hasattr(dist, name):
                setattr(dist, name, wrapped)
    return calls


def collate(texts: list[str]) -> dict:
    """Byte-level token ids, right-padded with 0, with the attention mask and labels (-100 on padding)."""
    return tiny.byte_collate(texts, MAX_LENGTH)


def most_over_ranks(n: int) -> int:
    """The largest ``n`` over every rank (taken before the run starts: not one of the run's collectives)."""
    value = torch.tensor(n)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value)


def lockstep(batches, iterations: int):
    """``iterations`` items of ``batches``, then None: a rank whose share has ended keeps stepping
    with no batch (as torch's ``Join`` does for uneven inputs), so every rank calls ``log()`` alike."""
    for _ in range(iterations):
        yield next(batches, None)


def teardown() -> None:
    """Leave together, close the process group and end the process: every worker calls this last,
    after its runs are finished and its report written. A gloo group still open at interpreter exit
    can abort the process ("terminate called without an active exception"), and once in a few dozen
    runs of the accelerate layouts a rank still aborted so at its end, after the barrier. ``os._exit``
    runs no destructor of torch's at exit (torch's teardown, not what these tests are about)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def report(out: str, rank: int, data: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(data, f)
