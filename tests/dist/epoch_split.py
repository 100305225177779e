"""The epoch estimate under torchrun for a streamed dataset split between the ranks.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist/epoch_split.py --out OUT --passes 2 FILE ...

Each rank streams its share of FILES (split_dataset_by_node: whole files where their count divides
by the world size, one example in world_size otherwise; --split shard: its own files; --split reshard: its own
row groups, a shard per row group) for --passes passes through ``run.iterate(loader)``, and
notes at every row how many of its own passes have ended.
"""
from __future__ import annotations

import argparse

import datasets
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader

import common
import stream_metrics

parser = argparse.ArgumentParser()
parser.add_argument("files", nargs="+")
parser.add_argument("--out", required=True)
parser.add_argument("--passes", type=int, default=2)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--log-every", type=int, default=2)
parser.add_argument("--split", choices=["by_node", "shard", "reshard"], default="by_node",
                    help="split_dataset_by_node, or IterableDataset.shard (each rank its own files, as accelerate does), "
                         "after IterableDataset.reshard() with reshard (each rank its own row groups)")
parser.add_argument("--repeat", type=int, default=0, help="stream.repeat(N) before the split (each pass then "
                                                             "holds N passes over the files)")
args = parser.parse_args()

rank, world = common.setup()
builder = "parquet" if args.files[0].endswith(".parquet") else "json"
stream = datasets.load_dataset(builder, data_files=args.files, split="train", streaming=True)
if args.split == "reshard":
    stream = stream.reshard()
if args.repeat:
    stream = stream.repeat(args.repeat)
share = (split_dataset_by_node(stream, rank=rank, world_size=world) if args.split == "by_node"
         else stream.shard(num_shards=world, index=rank))
loader = DataLoader(share, batch_size=args.batch_size, collate_fn=lambda examples: common.collate(
    [example["text"] for example in examples]))
batches_per_pass = sum(1 for _ in loader)  # known to the test, not to the run
iterations = common.most_over_ranks(args.passes * batches_per_pass) + 1

run = stream_metrics.init(backend="none")
ended = 0


def passes_over_share():
    global ended
    for _ in range(args.passes):
        yield from run.iterate(loader)  # sees this rank's pass end
        ended += 1


rows = []
for i, batch in enumerate(common.lockstep(passes_over_share(), iterations), start=1):
    if i % args.log_every == 0 or i == iterations:
        progress = run.log({"train/loss": 1.0})
        rows.append({**progress.to_dict(), "rank_passes": ended})
common.report(args.out, rank, {"rows": rows, "num_shards": share.num_shards})
run.finish()
common.teardown()
