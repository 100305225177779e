"""Counts the collectives a run issues under torchrun: none between rows, one at a row.

Every collective of ``torch.distributed`` is wrapped with a counter before the process group
exists (instrumentation: the real collective still runs), in both places it can be reached from
(``torch.distributed.X`` and ``torch.distributed.distributed_c10d.X``).
"""
from __future__ import annotations

import argparse

import common

calls = common.count_collectives()

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--mlflow-uri", required=True)
args = parser.parse_args()

import stream_metrics  # noqa: E402  (after the instrumentation, as a user's import would be)

rank, world = common.setup()
texts = [" ".join(["token"] * (rank + i % 7 + 1)) for i in range(60 + 17 * rank)]  # uneven on purpose
run = stream_metrics.init(backend=["mlflow", "wandb"], gradient_accumulation_steps=4,
                          mlflow={"tracking_uri": args.mlflow_uri, "experiment": "distributed"})


def since(mark: int) -> list[str]:
    return calls[mark:]


seen = {}
for row in range(3):
    mark = len(calls)
    for i in range(0, len(texts), 3 + row):  # many micro-batches between two rows, a different count per rank
        run.update(common.collate(texts[i:i + 3 + row]))
    seen[f"between_rows_{row}"] = since(mark)
    mark = len(calls)
    progress = run.log({"train/loss": 1.0})
    seen[f"row_{row}"] = since(mark)
mark = len(calls)
state = run.state_dict()
seen["state_dict"] = since(mark)
mark = len(calls)
run.finish()
seen["finish"] = since(mark)
common.report(args.out, rank, {"calls": seen, "progress": progress.to_dict(),
                               "expected_samples": 3 * len(texts)})
common.teardown()
