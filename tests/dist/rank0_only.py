"""``if rank == 0: save(run.state_dict())``: a collective that only rank 0 calls (torchrun, 2 ranks).

    python -m torch.distributed.run --nproc_per_node=2 tests/dist/rank0_only.py --out OUT \
        --mlflow-uri sqlite:///mlflow.db --call state_dict

Every rank adds 10 samples a batch and logs a row every 2 batches; after the second row, rank 0
alone calls ``state_dict()`` (or reads ``run.progress``) while rank 1 goes on to its next row.
Each rank reports the rows it got and the error it met, then the job leaves together.
"""
from __future__ import annotations

import argparse

import common
import stream_metrics

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--mlflow-uri", required=True)
parser.add_argument("--call", choices=["state_dict", "progress"], required=True)
args = parser.parse_args()

rank, world = common.setup()
run = stream_metrics.init(backend="mlflow", mlflow={"tracking_uri": args.mlflow_uri, "experiment": "rank0"})
rows, error = [], None
try:
    for i in range(1, 9):
        run.update(samples=10)
        if i % 2 == 0:
            rows.append(run.log({"train/loss": 1.0 / i}).samples)
        if i == 4 and rank == 0:
            rows.append(("alone", run.state_dict()["progress"]["samples"] if args.call == "state_dict"
                         else run.progress.samples))
except RuntimeError as exc:
    error = str(exc)
common.report(args.out, rank, {"rows": rows, "error": error, "run_ids": run.run_ids})
run.finish()
common.teardown()
