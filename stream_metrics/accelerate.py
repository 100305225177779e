"""The Hugging Face ``accelerate`` integration: a tracker for ``Accelerator(log_with=...)``.

    from accelerate import Accelerator
    from stream_metrics.accelerate import StreamMetricsTracker

    tracker = StreamMetricsTracker(backend=["mlflow", "wandb"], gradient_accumulation_steps=4)
    accelerator = Accelerator(log_with=tracker, gradient_accumulation_steps=4)
    accelerator.init_trackers("my_project", config={"lr": 3e-4})
    for batch in tracker.iterate(loader):      # counts samples and tokens; sees the pass end
        ...
        accelerator.log({"loss": loss})        # one row: the metrics plus every progress axis
    accelerator.end_training()

What it does, and why this way:
- It is a ``Run`` (run.py) behind accelerate's ``GeneralTracker`` interface, so rows, keys, tags
  and backends are exactly the plain loop's; ``tracker.run`` is that Run.
- accelerate never shows a tracker the batches, so the loop tells it: ``tracker.iterate(loader)``,
  or ``tracker.update(batch)`` per micro-batch (``gradient_accumulation_steps`` of them make a step).
  A window that the end of a pass cuts short makes its step there too, as ``accelerator.accumulate``
  does at the end of a prepared loader (``iterate`` sees the end; else call ``tracker.end_pass()``).
- ``accelerator.log(values, step=...)``: ``step`` is not used to place the row. Rows are placed
  by the progress axes (SCHEMA section 4), and ``progress/step`` counts optimizer steps itself.
- accelerate calls trackers on the main process only, while a row's counts are summed over every
  process in one collective that each process must join. With several processes, write rows with
  ``tracker.run.log(values)`` on every process instead of ``accelerator.log``.
"""
from __future__ import annotations

from ._checks import missing_extra

try:
    from accelerate.tracking import GeneralTracker
except ImportError as exc:  # one sentence naming the extra to install
    raise missing_extra(exc, "accelerate", "hf", "stream_metrics.accelerate") from None

from . import distributed
from .counting import warn_once
from .redact import redact_config
from .run import Run


class StreamMetricsTracker(GeneralTracker):
    """An accelerate tracker writing stream_metrics rows; takes the options of ``stream_metrics.init``.

    >>> import torch
    >>> from stream_metrics.accelerate import StreamMetricsTracker
    >>> tracker = StreamMetricsTracker(backend="none")
    >>> tracker.update({"input_ids": torch.ones(2, 5, dtype=torch.long)}, tokens=10)
    >>> tracker.log({"loss": 1.0}).samples
    2
    """

    name = "stream_metrics"
    requires_logging_directory = False
    # Every process holds a Run (the others count and join the row's collective); backends exist
    # on the main process only, as in the plain loop.
    main_process_only = False

    def __init__(self, backend="mlflow", x_axis: str = "samples", dataset_size=None,
                 gradient_accumulation_steps: int = 1, config=None, **options):
        super().__init__()
        self.run = Run(backend, x_axis, dataset_size, gradient_accumulation_steps, config, **options)

    @property
    def tracker(self) -> Run:
        """What ``accelerator.get_tracker("stream_metrics", unwrap=True)`` returns: the Run."""
        return self.run

    # ------------------------------------------------------------------ counting: the loop calls these
    def update(self, batch=None, *, samples=None, tokens=None, loss_tokens=None) -> None:
        """Account for one micro-batch (see ``Run.update``); call it on every process."""
        self.run.update(batch, samples=samples, tokens=tokens, loss_tokens=loss_tokens)

    def iterate(self, loader, *, count: bool = True):
        """Yield one pass over ``loader`` (a prepared one too), counting each batch (``Run.iterate``)."""
        return self.run.iterate(loader, count=count)

    def end_pass(self) -> None:
        """Say that a pass over the training data has ended, for loops that don't use ``iterate``."""
        self.run.end_pass()

    # ------------------------------------------------------------------ GeneralTracker
    def store_init_configuration(self, values: dict) -> None:
        """``accelerator.init_trackers(..., config=values)``: the run's hyperparameters, redacted."""
        if self.run.started:
            warn_once("accelerate-late-config", "init_trackers(config=...) came after the first row, when the "
                                                "runs were already open: that config is not logged")
            return
        self.run.config = {**self.run.config, **redact_config(values)}

    def log(self, values: dict, step: int | None = None, **kwargs):
        """One row: ``values`` plus every progress axis (``Run.log``); returns the Progress."""
        if distributed.world_size() > 1:
            raise RuntimeError(
                "stream_metrics: accelerator.log() reaches trackers on the main process only, but a row's "
                "counts are summed over every process in one collective: with several processes, call "
                "tracker.run.log(values) on every process instead")
        return self.run.log(values)

    def finish(self) -> None:
        """``accelerator.end_training()``: deliver every row and close the runs."""
        self.run.finish()

