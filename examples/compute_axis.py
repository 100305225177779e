"""Two model sizes compared at equal compute: the plain loop with ``model=``, on the FLOPs axis.

    python examples/compute_axis.py [--budget 3e10] [--out runs/compute]
    stream-metrics compare small wide --mlflow-uri sqlite:///runs/compute/mlflow.db --axis flops

A narrow and a wide tiny Llama train on the same byte-level corpus (written to local files) until
each has spent the same compute budget. Each run counts its training FLOPs from the model it is
given (``init(model=...)``: 6 x weights per token plus attention), so ``progress/flops`` puts both
on one compute axis: the narrow model sees several times more data for the same FLOPs. MLflow writes to
<out>/mlflow.db; W&B to <out>/wandb (offline).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import tiny  # noqa: E402

SIZES = {"small": 32, "wide": 96}  # hidden size; the MLP is twice as wide


def train(name: str, texts, *, uri: str, steps: int | None = None, budget: float | None = None,
          batch_size: int = 8, backend=("mlflow", "wandb"), peak_flops: float | None = None):
    """Train the ``name`` model for ``steps`` batches or until ``budget`` FLOPs; returns the Run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import stream_metrics

    torch.manual_seed(0)
    hidden = SIZES[name]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=258, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=0, attn_implementation="eager"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(texts, batch_size=batch_size, collate_fn=tiny.byte_collate)
    with stream_metrics.init(backend=list(backend), x_axis="flops", name=name, model=model, peak_flops=peak_flops,
                             mlflow={"tracking_uri": uri, "experiment": "compute"},
                             wandb={"project": "compute"}) as run:
        step, done = 0, False
        while not done:
            for batch in run.iterate(loader):
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                if step % 2 == 0 or step == steps:
                    progress = run.log({"train/loss": loss.item()})  # a row: the axes come back with it
                    done = step == steps or (budget is not None and progress.flops >= budget)
                if done:
                    break
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=3e10, help="training FLOPs for each model")
    parser.add_argument("--out", default="runs/compute")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("WANDB_DIR", args.out)
    texts = tiny.read_texts(tiny.write_corpus(os.path.join(args.out, "data")))
    uri = f"sqlite:///{os.path.abspath(args.out)}/mlflow.db"
    for name in SIZES:
        p = train(name, texts, budget=args.budget, uri=uri).progress
        print(f"{name}: {p.flops:.3g} FLOPs over {p.tokens} tokens in {p.wall_clock:.1f} s")
    print(f"stream-metrics compare {' '.join(SIZES)} --mlflow-uri {uri} --axis flops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
