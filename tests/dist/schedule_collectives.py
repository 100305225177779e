"""The Trainer with eval_every, save_every and stop_at under torchrun: what each step costs in collectives
and host syncs issued by stream_metrics, and where the evaluations and checkpoints land.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist/schedule_collectives.py --out OUT \
        --mlflow-uri sqlite:///mlflow.db --eval-every 250sp --save-every 15ktok --stop-at 1150sp FILE FILE

Every collective of ``torch.distributed`` and every host read of a tensor (``item``, ``tolist``,
``cpu``, ``numpy``, ``int()``, ``float()``, ``bool()``) is wrapped with a counter before anything is
imported (instrumentation: the real call still runs). A call counts as ours when a frame of the
``stream_metrics`` package is on its stack (the Trainer's and accelerate's own calls are not ours);
each is recorded with the optimizer step it happened in and the callback method that made it.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

import common

PACKAGE = os.path.join(common.ROOT, "stream_metrics") + os.sep
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_reduce_coalesced",
               "all_to_all", "all_to_all_single", "barrier", "broadcast", "broadcast_object_list", "gather",
               "gather_object", "monitored_barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor",
               "scatter", "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv")
HOST_READS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")
# Our callback's methods, innermost first wins: which one a call was made for.
CALLERS = ("_apply_schedules", "_take_state", "on_log", "on_train_begin", "on_train_end", "on_epoch_end")
trainer = None
phase = "train"
calls: list[dict] = []


def ours() -> str | None:
    """The callback method on the stack when a stream_metrics frame is (else None: not our call)."""
    frame, in_package, caller = sys._getframe(2), False, None
    while frame is not None:
        if frame.f_code.co_filename.startswith(PACKAGE):
            in_package = True
            if caller is None and frame.f_code.co_name in CALLERS:
                caller = frame.f_code.co_name
        frame = frame.f_back
    return (caller or "other") if in_package else None


def counted(kind, name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        caller = ours()
        if caller is not None:
            step = trainer.state.global_step if trainer is not None else -1
            calls.append({"kind": kind, "name": name, "step": step, "phase": phase, "caller": caller})
        return fn(*args, **kwargs)
    return wrapper


for name in COLLECTIVES:
    if hasattr(c10d, name):
        wrapped = counted("collective", name, getattr(c10d, name))
        setattr(c10d, name, wrapped)
        if hasattr(dist, name):
            setattr(dist, name, wrapped)
for name in HOST_READS:
    setattr(torch.Tensor, name, counted("host_sync", name, getattr(torch.Tensor, name)))

parser = argparse.ArgumentParser()
parser.add_argument("files", nargs="+")
parser.add_argument("--out", required=True)
parser.add_argument("--mlflow-uri", required=True)
parser.add_argument("--eval-every", required=True)
parser.add_argument("--save-every", required=True)
parser.add_argument("--stop-at", required=True)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--grad-accum", type=int, default=3)
parser.add_argument("--logging-steps", type=int, default=7)
args = parser.parse_args()

import datasets  # noqa: E402  (after the instrumentation, as a user's imports would be)
from transformers import TrainerCallback  # noqa: E402

import tiny  # noqa: E402
from stream_metrics.hf import StreamMetricsCallback  # noqa: E402
from streaming_trainer import build_trainer  # noqa: E402


class Recorder(TrainerCallback):
    """Before ours in the list: notes the rows (on_log), evaluations and the end, by optimizer step."""

    def __init__(self):
        self.rows, self.evaluations = [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.rows.append(state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluations.append(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        global phase
        phase = "end"


recorder = Recorder()
callback = StreamMetricsCallback(backend=["mlflow", "wandb"], eval_every=args.eval_every,
                                 save_every=args.save_every, stop_at=args.stop_at, progress=False,
                                 mlflow={"tracking_uri": args.mlflow_uri, "experiment": "distributed"})
trainer, _ = build_trainer(
    "trainer_out", max_steps=10_000, batch_size=args.batch_size, grad_accum=args.grad_accum,
    callbacks=[recorder, callback], data=args.files, logging_steps=args.logging_steps,
    accelerator_config={"dispatch_batches": False})
tokenizer = tiny.byte_tokenizer()
trainer.eval_dataset = datasets.Dataset.from_dict({"text": tiny.read_texts(args.files)[:8]}).map(
    lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"])
trainer.train()

rank = trainer.args.process_index
checkpoints = sorted(int(n.split("-")[1]) for n in os.listdir("trainer_out") if n.startswith("checkpoint-"))
common.report(args.out, rank, {"calls": calls, "rows": recorder.rows, "evaluations": recorder.evaluations,
                               "checkpoints": checkpoints, "final_step": trainer.state.global_step,
                               "progress": callback.saved_state["progress"]})
common.teardown()
