"""The plain-loop helper under torchrun: each rank reads its own files (uneven shares), logs rows.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist/plain_loop.py --out OUT \
        --mlflow-uri sqlite:///mlflow.db FILE [FILE ...]

Rank r reads FILES[r::world_size]. With --stop N the run ends after N batches (mid-pass) and rank
0 saves ``state_dict()`` to --save-state; with --resume STATE a new job continues from it, each rank
skipping the batches it had already trained on (--skip N), as a user's own data loader would.
"""
from __future__ import annotations

import argparse
import json

from torch.utils.data import DataLoader

import common
import stream_metrics
import tiny

parser = argparse.ArgumentParser()
parser.add_argument("files", nargs="+")
parser.add_argument("--out", required=True)
parser.add_argument("--mlflow-uri", required=True)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--log-every", type=int, default=3)
parser.add_argument("--accumulation", type=int, default=2)
parser.add_argument("--stop", type=int, help="end the run after this many batches, mid-pass")
parser.add_argument("--save-state", help="rank 0 writes state_dict() here (JSON)")
parser.add_argument("--resume", help="a state_dict() JSON to continue from, on every rank")
parser.add_argument("--skip", type=int, default=0, help="batches of this rank's data already trained on")
args = parser.parse_args()

rank, world = common.setup()
texts = tiny.read_texts(args.files[rank::world])[args.skip * args.batch_size:]
loader = DataLoader(texts, batch_size=args.batch_size, collate_fn=common.collate)
# One more step than the longest share, so that every rank sees its own pass end.
iterations = args.stop or common.most_over_ranks(len(loader)) + 1

run = stream_metrics.init(
    backend=["mlflow", "wandb"], gradient_accumulation_steps=args.accumulation,
    config={"batch_size": args.batch_size, "world_size": world},
    mlflow={"tracking_uri": args.mlflow_uri, "experiment": "distributed"}, wandb={"project": "distributed"})
if args.resume:
    with open(args.resume) as f:
        run.load_state_dict(json.load(f))  # on every rank: each continues the same global axes

rows = []
for i, batch in enumerate(common.lockstep(run.iterate(loader), iterations), start=1):
    if i % args.log_every == 0 or i == iterations:
        progress = run.log({"train/loss": 1.0 / i})  # every rank, every row: it is a collective
        rows.append(progress.to_dict())

state = run.state_dict()  # every rank: it brings the ranks together like a row
if rank == 0 and args.save_state:
    with open(args.save_state, "w") as f:
        json.dump(state, f)
common.report(args.out, rank, {"rows": rows, "state": state, "run_ids": run.run_ids,
                               "batches": min(args.stop or len(loader), len(loader))})
run.finish()
common.teardown()
