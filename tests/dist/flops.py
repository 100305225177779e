"""FLOPs under torchrun: each rank trains on its own file, counts FLOPs, and measures them with torch.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist/flops.py --out OUT --mlflow-uri URI FILE FILE

Rank r reads FILES[r::world_size] (uneven shares). Every rank wraps each forward and backward in
``FlopCounterMode`` (the ground truth) and reports what it measured beside the run's total.
"""
from __future__ import annotations

import argparse

from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

import common
import stream_metrics
import tiny

parser = argparse.ArgumentParser()
parser.add_argument("files", nargs="+")
parser.add_argument("--out", required=True)
parser.add_argument("--mlflow-uri", required=True)
parser.add_argument("--batch-size", type=int, default=8)
args = parser.parse_args()

rank, world = common.setup()
texts = tiny.read_texts(args.files[rank::world])
loader = DataLoader(texts, batch_size=args.batch_size, collate_fn=common.collate)
iterations = common.most_over_ranks(len(loader))
model = tiny.tiny_model()
model.set_attn_implementation("eager")  # FlopCounterMode sees eager attention's matrix products
model.train()

measured = 0
with stream_metrics.init(backend="mlflow", model=model, x_axis="flops",
                         mlflow={"tracking_uri": args.mlflow_uri, "experiment": "distributed"}) as run:
    for i, batch in enumerate(common.lockstep(run.iterate(loader), iterations), start=1):
        if batch is not None:
            with FlopCounterMode(display=False) as counter:
                model(**batch).loss.backward()
            measured += counter.get_total_flops()
        if i % 3 == 0 or i == iterations:
            run.log({"train/loss": 1.0 / i})  # every rank: a row is a collective
    flops = run.progress.flops
common.report(args.out, rank, {"measured_flops": measured, "flops": flops})
common.teardown()
