"""The Hugging Face Trainer with StreamMetricsCallback under torchrun (gloo on CPU).

    python -m torch.distributed.run --nproc_per_node=2 tests/dist/trainer.py --out OUT \
        --mlflow-uri sqlite:///mlflow.db --max-steps 5 FILE FILE

The demo's Trainer (examples/streaming_trainer.py) on a streamed JSONL dataset; accelerate gives
each rank its own files (``IterableDataset.shard``), so ranks see different numbers of examples
and tokens. With --save-steps and then --resume, a second job continues from the last checkpoint.
"""
from __future__ import annotations

import argparse

from transformers.trainer_utils import get_last_checkpoint

import common  # noqa: F401  (puts examples/ on the path)
from stream_metrics.hf import StreamMetricsCallback
from streaming_trainer import build_trainer

parser = argparse.ArgumentParser()
parser.add_argument("files", nargs="+")
parser.add_argument("--out", required=True)
parser.add_argument("--mlflow-uri", required=True)
parser.add_argument("--max-steps", type=int, default=5)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--grad-accum", type=int, default=3)
parser.add_argument("--save-steps", type=int, default=0, help="save a checkpoint every N steps")
parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
args = parser.parse_args()
output_dir = "trainer_out"  # shared by the jobs of one test (its working folder)

callback = StreamMetricsCallback(backend=["mlflow", "wandb"],
                                 mlflow={"tracking_uri": args.mlflow_uri, "experiment": "distributed"})
trainer, _ = build_trainer(
    output_dir, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
    callbacks=[callback], data=args.files, logging_steps=2, save_steps=args.save_steps,
    # Each rank reads its own batches: dispatching cannot concatenate batches padded to different widths.
    accelerator_config={"dispatch_batches": False})
trainer.train(resume_from_checkpoint=get_last_checkpoint(output_dir) if args.resume else None)

rank = trainer.args.process_index
common.report(args.out, rank, {"state": callback.saved_state, "world_size": trainer.args.world_size})
common.teardown()
