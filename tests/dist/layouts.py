"""Several ranks on one batch: tensor, context and pipeline parallelism under torchrun (4 CPU ranks).

    python -m torch.distributed.run --nproc_per_node=4 tests/dist/layouts.py --out OUT \
        --layouts tp-mesh,pp,dp FILE FILE FILE FILE

The layouts run one after the other in the one job (a run each, in the MLflow experiment
``layouts-<layout>``; a job's start-up is most of its time), and each rank reports
``{layout: what it saw}``. Every layout but ``dp`` has two data-parallel ranks; data-parallel rank i
reads FILES[i] in batches of --batch-size (the files differ in length, so one rank's share ends
first), and every rank logs a row every --log-every batches, with the collectives each rank issues
counted.

- ``dp``: pure data parallelism, 4 ranks, rank r reads FILES[r]; nothing given.
- ``tp-mesh`` / ``tp-group``: a (dp=2, tp=2) DeviceMesh; the two ranks of a tensor-parallel pair
  feed the model identical batches; ``data_parallel_group=mesh["dp"]`` or its ProcessGroup.
- ``cp-sliced``: a (dp=2, cp=2) mesh; each rank of a context-parallel pair counts its half of every
  sequence (input ids, mask, labels and position ids split along the sequence, as torch's context
  parallelism does before the model's forward).
- ``cp-packed``: the same, with each batch packed into one row (padding-free: position ids restart at
  0 for each example), so the example starts fall on both ranks of a pair.
- ``cp-whole``: the same mesh, each rank counting the whole batch before the split (sliced=False).
- ``pp``: a (dp=2, pp=2) mesh; only the first stage reads batches, the second stage's forward sees
  activations (``inputs_embeds``), which it counts as a naive loop would.
- ``accelerate-tp`` / ``accelerate-cp``: no option; the layout is detected from the Trainer's
  arguments holding accelerate's ``ParallelismConfig(dp_shard_size=2, tp_size=2)`` (or ``cp_size=2``,
  counted sliced, as the Trainer's forward sees it), and the ranks share batches as accelerate's own
  device mesh (``ParallelismConfig.build_device_mesh``) says. (accelerate refuses a ParallelismConfig
  for a Trainer on CPU, so the Trainer itself cannot run here; its arguments and mesh are real.)
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.data import DataLoader

import common
import stream_metrics
import tiny

LAYOUTS = ["dp", "tp-mesh", "tp-group", "cp-sliced", "cp-packed", "cp-whole", "pp", "accelerate-tp", "accelerate-cp"]
parser = argparse.ArgumentParser()
parser.add_argument("files", nargs="+")
parser.add_argument("--out", required=True)
parser.add_argument("--layouts", required=True, help="a comma-separated list of " + ", ".join(LAYOUTS))
parser.add_argument("--mlflow-uri")
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--log-every", type=int, default=3)
args = parser.parse_args()
assert set(args.layouts.split(",")) <= set(LAYOUTS), args.layouts

calls = common.count_collectives()
rank, world = common.setup()


def one_layout(layout: str) -> dict:
    """Train one pass over this rank's share with ``layout``; what this rank saw."""
    options, stage, peer = {}, 0, 0
    if layout == "dp":
        data_index = rank
    elif layout.startswith("accelerate"):
        from accelerate import ParallelismConfig
        from transformers import TrainingArguments

        from stream_metrics.hf import detect_layout

        second = layout.split("-")[1]
        config = ParallelismConfig(dp_shard_size=2, **{f"{second}_size": world // 2})
        mesh = config.build_device_mesh("cpu")  # accelerate's own mesh: which ranks share a batch
        data_index, peer = mesh["dp"].get_local_rank(), mesh[second].get_local_rank()
        training_args = TrainingArguments("trainer_out", parallelism_config=config, use_cpu=True, report_to="none")
        options["layout"] = detect_layout(training_args, None)  # what StreamMetricsCallback.on_train_begin does
    else:
        second = {"tp-mesh": "tp", "tp-group": "tp", "cp-sliced": "cp", "cp-packed": "cp", "cp-whole": "cp",
                  "pp": "pp"}[layout]
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", second))
        data_index, peer = mesh["dp"].get_local_rank(), mesh[second].get_local_rank()
        options["data_parallel_group"] = mesh.get_group("dp") if layout == "tp-group" else mesh["dp"]
        if second == "cp":
            options.update(context_parallel_group=mesh["cp"], context_parallel_sliced=layout != "cp-whole")
        if second == "pp":
            stage = peer

    refused = None
    if layout == "tp-mesh":
        try:  # the whole (dp, tp) mesh instead of mesh["dp"]: a mistake to refuse, not to count wrongly
            stream_metrics.init(backend="none", data_parallel_group=mesh)
        except ValueError as exc:
            refused = str(exc)

    texts = tiny.read_texts([args.files[data_index]])
    loader = DataLoader(texts, batch_size=args.batch_size, collate_fn=common.collate)
    iterations = common.most_over_ranks(len(loader)) + 1
    backend = {"backend": ["mlflow"], "mlflow": {"tracking_uri": args.mlflow_uri, "experiment": f"layouts-{layout}"}} \
        if args.mlflow_uri else {"backend": "none"}
    # FLOPs at a fixed 10 per token of the batch's shape, so the test can check them from the data it fed.
    run = stream_metrics.init(**backend, gradient_accumulation_steps=2, flops_per_token=10, **options)

    def what_this_rank_sees(batch: dict) -> dict:
        """The batch as the counting point on this rank sees it."""
        if layout == "cp-packed":
            mask = batch["attention_mask"].bool()
            lengths = mask.sum(dim=1).tolist()
            packed = {"input_ids": batch["input_ids"][mask][None], "labels": batch["labels"][mask][None],
                      "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
            return {k: v.tensor_split(2, dim=1)[peer] for k, v in packed.items()}
        if layout in ("cp-sliced", "accelerate-cp"):
            positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
            whole = {**batch, "position_ids": positions}
            return {k: v.tensor_split(2, dim=1)[peer] for k, v in whole.items()}  # this rank's half of each row
        if layout == "pp" and stage == 1:
            return {"inputs_embeds": torch.zeros(*batch["input_ids"].shape, 8)}  # activations from stage 0
        return batch

    rows, marks, fed = [], len(calls), 0  # fed: tokens in the shapes of the batches this rank read (padding too)
    between, at_rows = [], []
    # The ranks that read the data see their pass end (the epoch); a later pipeline stage only gets activations.
    batches = iter(loader) if stage == 1 else run.iterate(loader, count=False)
    for i, batch in enumerate(common.lockstep(batches, iterations), start=1):
        if batch is not None:
            run.update(what_this_rank_sees(batch))
            if stage == 0:
                fed += int(batch["attention_mask"].sum()) if layout == "cp-packed" else batch["input_ids"].numel()
        if i % args.log_every == 0 or i == iterations:
            between.append(calls[marks:])
            marks = len(calls)
            rows.append(run.log({"train/loss": 1.0 / i}).to_dict())
            at_rows.append(calls[marks:])
            marks = len(calls)
    state = run.state_dict()
    seen = {"rows": rows, "state": state, "between_rows": between, "at_rows": at_rows,
            "tag": run.layout.describe(), "distinct_devices": run.layout.distinct_devices,
            "run_ids": run.run_ids, "data_index": data_index, "stage": stage,
            "whole_mesh_refused": refused, "peer": peer, "fed": fed}
    run.finish()
    return seen


seen = {}
for name in args.layouts.split(","):
    seen[name] = one_layout(name)
    dist.barrier()  # the next layout starts together
common.report(args.out, rank, seen)
common.teardown()
