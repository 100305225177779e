"""A custom training loop with Hugging Face accelerate, logging through ``Accelerator(log_with=...)``.

    python examples/accelerate_loop.py            # MLflow (./mlflow.db) and W&B offline (./wandb)

The tracker is told about each micro-batch by ``tracker.iterate(loader)``; ``accelerator.log``
then writes rows with every progress axis added. With several processes (``accelerate launch``),
write rows with ``tracker.run.log(...)`` on every process instead (see stream_metrics/accelerate.py).
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import DataCollatorForLanguageModeling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny  # noqa: E402

from stream_metrics.accelerate import StreamMetricsTracker  # noqa: E402


def train(data: list[str], *, passes: int = 2, batch_size: int = 8, grad_accum: int = 2,
          backend=("mlflow", "wandb"), log_every: int = 3, **tracker_options) -> tuple[StreamMetricsTracker, int]:
    """Train the tiny model for ``passes`` passes over the JSONL files ``data``; returns (tracker, optimizer steps)."""
    tokenizer = tiny.byte_tokenizer()
    loader = DataLoader(tiny.streaming_dataset(data, tokenizer), batch_size=batch_size,
                        collate_fn=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    tracker = StreamMetricsTracker(backend=list(backend), gradient_accumulation_steps=grad_accum, **tracker_options)
    accelerator = Accelerator(log_with=tracker, gradient_accumulation_steps=grad_accum, cpu=True)
    model = tiny.tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.init_trackers("accelerate-example", config={"learning_rate": 3e-3, "batch_size": batch_size,
                                                            "gradient_accumulation_steps": grad_accum})
    steps = 0
    for _ in range(passes):
        for batch in tracker.iterate(loader):  # counts the batch; the pass end is seen
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                steps += 1
                if steps % log_every == 0:
                    accelerator.log({"train/loss": loss.item()}, step=steps)
    accelerator.log({"train/loss": loss.item()}, step=steps)  # a last row, with the passes' exact epoch
    accelerator.end_training()
    return tracker, steps


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    folder = tempfile.mkdtemp(prefix="stream_metrics_corpus_")
    tracker, steps = train(tiny.write_corpus(folder))
    print(f"{steps} optimizer steps; progress: {tracker.run.progress}")
    for line in tracker.run.where():
        print(line)
