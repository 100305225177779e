"""stream_metrics: charts keyed by how much data a model has seen, for streamed training data.

    import stream_metrics

    with stream_metrics.init(backend=["mlflow", "wandb"], gradient_accumulation_steps=4) as run:
        for batch in run.iterate(loader):          # counts samples and tokens; sees the pass end
            loss = model(**batch).loss
            ...
            run.log({"loss": loss})                # one row: the metrics plus every progress axis

The Hugging Face Trainer: ``callbacks=[stream_metrics.hf.StreamMetricsCallback()]``.

Zero code: ``stream_metrics.autolog()``, or ``stream-metrics run -- COMMAND``.

Layout, in the order data flows: counting.py (batch -> counts), flops.py (batch -> FLOPs),
progress.py (the record), epoch.py (the epoch estimate), layout.py and distributed.py (which ranks
add up, and the row's one collective), schema.py (every key and tag), sanitize.py and redact.py
(what may be stored), backends/ (MLflow, W&B, delivery, spill), lifecycle.py (however the process
ends), run.py (the plain-loop helper), hf.py and autolog.py (the Trainer), check.py, compare/ and
cli.py (the command line).
Only torch is needed to import this package; each backend and integration imports its library
when it is used.
"""
from . import schema
from .autolog import autolog
from .progress import Progress
from .run import Run, init
from .version import __version__

__all__ = ["Progress", "Run", "autolog", "init", "schema", "__version__"]
