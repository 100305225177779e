"""Which ranks read different data, so that each example and token counts once per job.

Pure data parallelism (DDP, FSDP, ZeRO) gives every rank its own batches: every rank's counts
are added. Tensor and pipeline parallelism, and context or sequence parallelism, put several ranks
on one batch; adding their counts would count it several times. Peers count over the
data-parallel group (OLMo-core, nanotron), reduce token counts over the data x context mesh
(torchtitan), or divide a world sum by tp x cp x pp (Megatron). Here:

- Each rank knows its own data-parallel group (``data_parallel_group=``: a ProcessGroup, or a
  ``DeviceMesh`` of the data-parallel dimension(s)). Rank 0's group reads the job's data; any rank
  outside it is a replica of one of its members (a tensor-parallel peer, a later pipeline stage)
  and adds nothing.
- Context/sequence parallelism (``context_parallel_group=``): the ranks of a group share one batch.
  Where the counting point sees the batch before the split (``sliced=False``) they are replicas
  too. Where it sees each rank's slice (``sliced=True``: the Trainer's forward under accelerate's
  context parallelism, DeepSpeed's Ulysses), every rank of the group adds its tokens; the rows,
  the same on every rank, are counted by the group's first rank only (``rows_counted_elsewhere``),
  and example starts read from ``position_ids`` (packed batches; each row's start under torch's
  sharding) by the rank holding them.
- Nothing is exchanged for this at start or between rows: each rank sends the lowest rank of its
  data-parallel and context-parallel groups with the row's one gather (``fields()``), and every
  rank works out the same weights from what it gathered (``weights()``).

``detect()`` reads the layout that accelerate's ``ParallelismConfig``, the Trainer's arguments,
a model loaded with ``tp_size``/``tp_plan`` or DeepSpeed's AutoTP state, so the Trainer callback is
right with no option.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch.distributed as dist

from . import distributed
from .record import LayoutFields, RankRecord

# Mesh dimensions where several ranks share one batch: a DeviceMesh given as the data-parallel
# group must not have them (a whole (dp, tp) mesh is a mistake for mesh["dp"]).
_SHARED_BATCH_DIMS = ("tp", "cp", "sp", "pp", "ep", "tensor", "context", "sequence", "pipeline")
# accelerate's mesh order (ParallelismConfig._get_mesh): the last dimension varies fastest over ranks.
_ACCELERATE_ORDER = ("dp_replicate", "dp_shard", "cp", "sp", "tp")


@dataclass(frozen=True)
class Layout:
    """This rank's place in the job: its data-parallel group, and its context-parallel group if any.

    >>> layout = Layout.every_rank(world=4)
    >>> layout.data_parallel_size, layout.distinct_devices, layout.describe()
    (4, 4, '4 (every rank)')
    """

    data_parallel: tuple[int, ...]              # this rank's data-parallel group (global ranks)
    context_parallel: tuple[int, ...] = ()      # this rank's context/sequence-parallel group, if any
    sliced: bool = True                         # the counting point sees each rank's slice of the batch
    source: str = "every rank"                  # what was given or detected (the run's tag says it)
    world: int = 1

    @classmethod
    def every_rank(cls, world: int | None = None) -> "Layout":
        world = distributed.world_size() if world is None else world
        return cls(data_parallel=tuple(range(world)), world=world)

    @property
    def data_parallel_size(self) -> int:
        """How many ranks read different batches."""
        return len(self.data_parallel)

    @property
    def rows_counted_elsewhere(self) -> bool:
        """Sliced context parallelism, and not the group's first rank: this rank's rows are not samples."""
        return len(self.context_parallel) > 1 and self.sliced and min(self.context_parallel) != distributed.rank()

    @property
    def distinct_devices(self) -> int:
        """The devices doing distinct work, for per-device throughput and MFU: every rank of the job.

        Under tensor, context and pipeline parallelism each rank computes its own part of the
        batch (a slice of every matrix, of the sequence, a stage), so per-device figures divide the
        job's total by the world size, as torchtitan (tokens per second per device) and Megatron
        (TFLOP/s per GPU) do.
        """
        return self.world

    def fields(self) -> LayoutFields:
        """What this rank sends with the row's one gather for ``weights()``."""
        me = distributed.rank()
        cp = self.context_parallel or (me,)
        return {"dp_first": min(self.data_parallel), "cp_first": min(cp),
                "cp_sliced": int(self.sliced and len(cp) > 1)}

    def describe(self) -> str:
        """The run's ``stream_metrics.data_parallel`` tag: the size, and how it was found."""
        text = f"{self.data_parallel_size} ({self.source}"
        if len(self.context_parallel) > 1:
            text += f"; context parallel {len(self.context_parallel)}, {'sliced' if self.sliced else 'whole batch'}"
        return text + ")"


def weights(ranks: list[RankRecord]) -> list[int]:
    """1 for each rank whose counts are added, 0 for a replica, from every rank's ``Layout.fields()``.

    Every rank computes the same answer from the same gathered numbers.
    """
    split_groups = {r["cp_first"] for r in ranks if r["dp_first"] == 0 and r["cp_sliced"]}
    # Rank 0's data-parallel group, and the ranks holding slices of the batches its members read.
    return [int(r["dp_first"] == 0 or bool(r["cp_sliced"] and r["cp_first"] in split_groups)) for r in ranks]


def readers(ranks: list[RankRecord], weights: list[int]) -> list[RankRecord]:
    """One gathered record per distinct batch stream, for the epoch estimate: rank 0's data-parallel
    group, each with the samples of its context-parallel group's slices added in."""
    out: list[RankRecord] = []
    for r in ranks:
        if r["dp_first"] != 0:
            continue
        if r["cp_sliced"]:
            group = [p for p, w in zip(ranks, weights) if w and p["cp_first"] == r["cp_first"]]
            r = r.copy()
            r["samples"] = sum(p["samples"] for p in group)
            r["samples_in_pass"] = sum(p["samples_in_pass"] for p in group)
            r["first_pass_samples"] = (sum(p["first_pass_samples"] for p in group)
                                       if all(p["first_pass_samples"] >= 0 for p in group) else -1)
        out.append(r)
    return out


# ---------------------------------------------------------------------- given groups
def group_ranks(group, what: str) -> tuple[int, ...]:
    """The global ranks of a ProcessGroup or of a DeviceMesh (this rank's group), checked."""
    if group is None:
        return ()
    mesh = getattr(group, "mesh", None)
    if mesh is not None and hasattr(group, "mesh_dim_names"):
        names = tuple(group.mesh_dim_names or ())
        # Flattened dimensions too: accelerate's "dp_cp" or "dp_shard_cp" hold the CP ranks of one batch.
        shared = [n for n in names if set(n.lower().split("_")) & set(_SHARED_BATCH_DIMS)]
        if shared and what == "data_parallel_group":
            raise ValueError(f"{what}= got a DeviceMesh with dimension(s) {shared}, where ranks share a batch: "
                             f"pass only its data-parallel dimension(s), e.g. mesh['dp'] (a mesh of dimensions "
                             f"{names}), and a context-parallel dimension as context_parallel_group=")
        ranks = tuple(int(r) for r in mesh.flatten().tolist())
    elif isinstance(group, dist.ProcessGroup):
        ranks = tuple(dist.get_process_group_ranks(group))
    else:
        raise TypeError(f"{what}={group!r}: pass a torch.distributed ProcessGroup or a DeviceMesh "
                        "(e.g. mesh['dp'])")
    if distributed.rank() not in ranks:
        raise ValueError(f"{what}= does not hold this rank ({distributed.rank()}; it holds ranks {list(ranks)}): "
                         "each rank passes its own group, e.g. mesh['dp'] or mesh.get_group('dp') on every rank")
    return ranks


def given(data_parallel_group=None, context_parallel_group=None, sliced: bool = True) -> Layout | None:
    """The layout the user passed to ``init``; None where nothing was given."""
    if data_parallel_group is None and context_parallel_group is None:
        return None
    world = distributed.world_size()
    dp = group_ranks(data_parallel_group, "data_parallel_group") or tuple(range(world))
    cp = group_ranks(context_parallel_group, "context_parallel_group")
    if len(cp) > 1 and set(cp) & set(dp) != {distributed.rank()}:
        raise ValueError(f"context_parallel_group (ranks {list(cp)}) and data_parallel_group (ranks {list(dp)}) "
                         "overlap: the data-parallel group names the ranks that read different batches, and "
                         "a context-parallel group the ranks that share one (e.g. mesh['dp'] and mesh['cp'])")
    named = ", ".join(f"{name}={type(group).__name__}" for name, group in (
        ("data_parallel_group", data_parallel_group), ("context_parallel_group", context_parallel_group))
        if group is not None)
    return Layout(data_parallel=dp, context_parallel=cp if len(cp) > 1 else (), sliced=bool(sliced),
                  source=f"given: {named}", world=world)


# ---------------------------------------------------------------------- detected layouts
def from_sizes(sizes: dict[str, int], source: str, sliced: bool = True, rank: int | None = None,
               world: int | None = None) -> Layout:
    """The layout of accelerate's mesh (dimensions in ``_ACCELERATE_ORDER``, the last varying fastest).

    >>> from_sizes({"dp_shard": 2, "tp": 2}, "ParallelismConfig", rank=1, world=4).data_parallel
    (1, 3)
    """
    rank = distributed.rank() if rank is None else rank
    world = distributed.world_size() if world is None else world
    dims = [(name, int(sizes.get(name) or 1)) for name in _ACCELERATE_ORDER]
    if math.prod(size for _, size in dims) != world:
        # A layout that does not cover the job is not one we can place ranks in: count every rank.
        raise ValueError(f"the parallelism sizes {dict(dims)} do not multiply to the world size {world}")
    strides, stride = {}, 1
    for name, size in reversed(dims):
        strides[name] = stride
        stride *= size
    coords = {name: (rank // strides[name]) % size for name, size in dims}

    def group(names) -> tuple[int, ...]:
        # Every rank that differs from this one only along ``names``.
        base = rank - sum(coords[n] * strides[n] for n in names)
        ranks = [base]
        for n in names:
            ranks = [r + i * strides[n] for r in ranks for i in range(dict(dims)[n])]
        return tuple(sorted(ranks))

    dp = group(("dp_replicate", "dp_shard"))
    split = [n for n in ("cp", "sp") if dict(dims)[n] > 1]
    cp = group(split) if split else ()
    return Layout(data_parallel=dp, context_parallel=cp, sliced=sliced, source=f"detected: {source}", world=world)


def _sizes_text(sizes: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items() if v and v > 1) or "data parallel"


def detect(args=None, model=None) -> Layout | None:
    """The layout the Trainer or accelerate states, or None (then every rank reads its own data).

    Reads, first found: the Trainer's ``args.parallelism_config`` or the running accelerator's
    (accelerate's ``ParallelismConfig``: dp_replicate, dp_shard, cp, sp, tp); a model loaded with
    ``tp_size``/``tp_plan`` (transformers' ``distributed_config``); DeepSpeed's AutoTP size
    (``tensor_parallel.autotp_size`` in the Trainer's DeepSpeed config). Context and sequence
    parallelism split each batch before the model's forward sees it (accelerate shards the inputs
    in place; DeepSpeed's Ulysses adapter in the loader), so they are counted as sliced.
    """
    if distributed.world_size() <= 1:
        return None
    config = getattr(args, "parallelism_config", None) or _accelerate_parallelism_config()
    model_tp = _model_tp_size(model)
    autotp = _deepspeed_autotp_size(args)
    if config is not None:
        sizes = {name: int(getattr(config, f"{name}_size", 1) or 1) for name in _ACCELERATE_ORDER}
        if model_tp > 1:  # the Trainer sets it from the model (Trainer.create_accelerator_and_postprocess)
            sizes["tp"] = model_tp
        source = f"ParallelismConfig({_sizes_text(sizes)})"
    elif model_tp > 1 or autotp > 1:
        tp = model_tp if model_tp > 1 else autotp
        sizes = {"dp_shard": distributed.world_size() // tp, "tp": tp}
        source = f"model tp_size={tp}" if model_tp > 1 else f"DeepSpeed AutoTP autotp_size={tp}"
    else:
        return None
    if all(sizes[n] == 1 for n in ("cp", "sp", "tp")):
        return None  # pure data parallelism: every rank reads its own data, as by default
    total = math.prod(sizes.values())
    if total != distributed.world_size() and sizes["dp_replicate"] * sizes["dp_shard"] == 1:
        # accelerate fills the data-parallel size in from the process count (_validate_accelerator).
        sizes["dp_shard"] = distributed.world_size() // (total or 1)
    try:
        return from_sizes(sizes, source)
    except ValueError as exc:
        from .counting import warn_once

        warn_once("layout-sizes", f"{exc}; counts are added over every rank. Pass data_parallel_group= "
                                  "(and context_parallel_group=) to say which ranks read different data")
        return None


def _accelerate_parallelism_config():
    # Only where accelerate is already in use: importing it here would cost every plain loop.
    state_module = sys.modules.get("accelerate.state")
    if state_module is None:
        return None
    try:
        state = state_module.AcceleratorState._shared_state
    except AttributeError:
        return None
    return state.get("parallelism_config") if isinstance(state, dict) else None


def _model_tp_size(model) -> int:
    for owner in (model, getattr(model, "module", None)):
        for name in ("_tp_size", "tp_size"):
            size = getattr(owner, name, None)
            if isinstance(size, int) and size > 1:
                return size
    return 1


def _deepspeed_autotp_size(args) -> int:
    ds = getattr(args, "hf_deepspeed_config", None)
    config = getattr(ds, "config", None)
    if isinstance(config, dict):
        size = (config.get("tensor_parallel") or {}).get("autotp_size", 1)
        if isinstance(size, int):
            return size
    return 1
