"""The main demo: a Hugging Face Trainer on a streamed dataset, with progress axes in MLflow and W&B.

A tiny causal LM (built from a config) trains on JSONL files streamed with
``datasets.load_dataset("json", ..., streaming=True)``; ``max_steps`` goes beyond one pass, so the
stream starts again and the epoch estimate switches from none (no size known) to the measured
pass. MLflow writes to ./mlflow.db (SQLite) and W&B to ./wandb (offline): no account or server.

    python examples/streaming_trainer.py [--max-steps 60] [--batch-size 8] [--out runs/demo]
    python examples/streaming_trainer.py --save-steps 10 ...; then again with --resume last

The only stream_metrics line is the callback in ``callbacks=[...]``.
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


def build_trainer(out: str, *, max_steps: int, batch_size: int, grad_accum: int = 2, workers: int = 0,
                  callbacks=(), report_to="none", data=None, logging_steps: int = 5, save_steps: int = 0,
                  seed: int = 0, **training_args):
    """The Trainer of the demo (also used by the tests): returns (trainer, corpus paths)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    paths = data or tiny.write_corpus(os.path.join(out, "data"))
    tokenizer = tiny.byte_tokenizer()
    args = TrainingArguments(
        output_dir=out, max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, learning_rate=3e-3, logging_steps=logging_steps,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, report_to=report_to,
        dataloader_num_workers=workers, use_cpu=True, seed=seed, disable_tqdm=True, **training_args)
    trainer = Trainer(model=tiny.tiny_model(), args=args, train_dataset=tiny.streaming_dataset(paths, tokenizer),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      processing_class=tokenizer, callbacks=list(callbacks))
    return trainer, paths


def last_complete_checkpoint(folder: str) -> str | None:
    """The newest checkpoint the Trainer finished writing. It writes trainer_state.json last, so a
    process killed in the middle of a save leaves a folder without it, which the Trainer cannot load
    (transformers' get_last_checkpoint would pick that folder)."""
    steps = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        number = name[len("checkpoint-"):]
        if name.startswith("checkpoint-") and number.isdigit() and os.path.isfile(
                os.path.join(folder, name, "trainer_state.json")):
            steps.append(int(number))
    return os.path.join(folder, f"checkpoint-{max(steps)}") if steps else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--experiment", help="the MLflow experiment and W&B project "
                                             "(default: $MLFLOW_EXPERIMENT_NAME, else stream_metrics_demo)")
    parser.add_argument("--save-steps", type=int, default=0, help="save a checkpoint every N steps")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="a checkpoint folder, or 'last' for the newest")
    args = parser.parse_args(argv)
    # The demo's runs go to their own experiment, so `stream-metrics compare --experiment NAME`
    # finds exactly them; the run is named after --out (e.g. runs/bs8 -> "bs8").
    experiment = args.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "stream_metrics_demo"
    os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment
    os.environ["WANDB_PROJECT"] = args.experiment or os.environ.get("WANDB_PROJECT") or experiment

    from stream_metrics.hf import StreamMetricsCallback

    callback = StreamMetricsCallback(backend=["mlflow", "wandb"])
    trainer, paths = build_trainer(args.out, max_steps=args.max_steps, batch_size=args.batch_size,
                                   grad_accum=args.grad_accum, callbacks=[callback], save_steps=args.save_steps,
                                   run_name=os.path.basename(os.path.normpath(args.out)))
    resume = args.resume
    if resume == "last":
        resume = last_complete_checkpoint(args.out)
    # Resuming continues every progress axis and the same MLflow and W&B runs.
    trainer.train(resume_from_checkpoint=resume)

    p = callback.run.progress
    print(f"\nTrained {p.step} steps on {p.samples} samples and {p.tokens} tokens "
          f"({p.epoch:.2f} passes over {len(paths)} files; epoch source: {p.epoch_source}) "
          f"in {p.wall_clock:.1f} s.")
    print("Where to look:")
    for line in callback.run.where():
        print("  " + line)
    print("  Charts are keyed by progress/samples; in the MLflow UI the Step axis is samples.")
    print(f"  This run is {os.path.basename(os.path.normpath(args.out))!r} in the experiment {experiment!r}: "
          f"stream-metrics compare --experiment {experiment}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
