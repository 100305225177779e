"""A plain PyTorch training loop on a streamed dataset, with progress axes in MLflow and W&B.

A tiny causal LM (built from a config) trains on variable-length token sequences streamed from
JSONL files with ``datasets.load_dataset("json", ..., streaming=True)``, with gradient
accumulation, for two passes over the stream. ``run.iterate`` counts every micro-batch and sees
each pass end, so the epoch becomes exact after the first pass.

    python examples/plain_loop.py [--passes 2] [--batch-size 8] [--grad-accum 2] [--out runs/plain]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=3, help="write a row every N optimizer steps")
    parser.add_argument("--out", default="runs/plain")
    parser.add_argument("--experiment", default="stream_metrics_plain_loop")
    parser.add_argument("--backend", nargs="+", default=["mlflow", "wandb"])
    args = parser.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForLanguageModeling

    import stream_metrics

    paths = tiny.write_corpus(os.path.join(args.out, "data"))
    tokenizer = tiny.byte_tokenizer()
    loader = DataLoader(tiny.streaming_dataset(paths, tokenizer), batch_size=args.batch_size,
                        collate_fn=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    model = tiny.tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    config = {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": 3e-3, "files": len(paths)}

    with stream_metrics.init(backend=args.backend, gradient_accumulation_steps=args.grad_accum, config=config,
                             project=args.experiment, pad_token_id=tokenizer.pad_token_id) as run:
        steps = 0
        for _ in range(args.passes):
            in_window = 0
            for batch in run.iterate(loader):  # counts samples and tokens; sees the pass end
                loss = model(**batch).loss / args.grad_accum
                loss.backward()
                in_window += 1
                if in_window < args.grad_accum:
                    continue
                in_window, steps = 0, steps + 1
                optimizer.step()
                optimizer.zero_grad()
                if steps % args.log_every == 0:
                    run.log({"train/loss": loss.detach() * args.grad_accum})  # a device scalar: read at the row
            if in_window:  # a window the pass end cut short still makes a step, as progress/step counts it
                steps += 1
                optimizer.step()
                optimizer.zero_grad()
        p = run.log({"train/loss": loss.detach() * args.grad_accum})
        where = run.where()
    print(f"\nTrained {p.step} steps on {p.samples} samples and {p.tokens} tokens "
          f"({p.epoch:.2f} passes; epoch source: {p.epoch_source}) in {p.wall_clock:.1f} s.")
    print("Where to look:")
    for line in where:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
