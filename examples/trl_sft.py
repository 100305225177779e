"""TRL's SFTTrainer on a streamed JSONL dataset, with and without packing, plus stream_metrics.

    python examples/trl_sft.py            # packed; MLflow (./mlflow.db) and W&B offline (./wandb)
    python examples/trl_sft.py --no-packing

The one stream_metrics line is ``callbacks=[StreamMetricsCallback(...)]``. With ``packing=True``
TRL packs several examples into each row and yields padding-free batches; ``progress/samples``
still counts examples (where ``position_ids`` restart at 0), so packing does not change its meaning.
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny  # noqa: E402

from stream_metrics.hf import StreamMetricsCallback  # noqa: E402


def build_sft_trainer(data: list[str], output_dir: str, *, packing: bool, max_steps: int, batch_size: int = 8,
                      max_length: int = 256, callbacks=(), **config):
    """An SFTTrainer on the JSONL files ``data`` (a ``text`` field), streamed with ``datasets``."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    stream = datasets.load_dataset("json", data_files=data, split="train", streaming=True)
    args = SFTConfig(output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
                     packing=packing, max_length=max_length, learning_rate=3e-3, logging_steps=2,
                     report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", **config)
    return SFTTrainer(model=tiny.tiny_model(), args=args, train_dataset=stream,
                      processing_class=tiny.byte_tokenizer(max_length), callbacks=list(callbacks))


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    folder = tempfile.mkdtemp(prefix="stream_metrics_sft_")
    callback = StreamMetricsCallback(backend=["mlflow", "wandb"])
    trainer = build_sft_trainer(tiny.write_corpus(os.path.join(folder, "data")), os.path.join(folder, "out"),
                                packing="--no-packing" not in sys.argv, max_steps=12, callbacks=[callback])
    trainer.train()
    print(callback.run.progress)
