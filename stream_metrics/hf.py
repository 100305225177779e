"""The Hugging Face Trainer integration: one line in an existing training script.

    from stream_metrics.hf import StreamMetricsCallback

    trainer = Trainer(..., callbacks=[StreamMetricsCallback()])

What it does, and why this way:
- Callbacks never see batches, so a forward pre-hook on the model counts every training
  micro-batch, in the main process, after collation and device placement (``module.training`` is
  False during evaluation, and batches skipped on resume are never forwarded). Counting stays on
  the device; the host reads it only when the Trainer logs.
- The Trainer's own W&B and MLflow integrations, where ``report_to`` names them, are taken out of
  the callback list (one run per backend, every metric once); by default this callback then logs
  to the backends they would have used.
- The Trainer's ``epoch`` is progress towards ``max_steps`` for a stream: it is not logged. Ours
  comes from the dataset (sized: the Trainer's exact epoch; a stream: metadata, shards or
  ``dataset_size`` until a pass ends, then the measured pass).
- Tensor, context and sequence parallelism stated in the Trainer's arguments, accelerate's
  ``ParallelismConfig``, a model loaded with ``tp_size`` or DeepSpeed AutoTP are read
  (``layout.detect``), so each example and token counts once with no option.
- State goes into every checkpoint (``ExportableState``), so ``resume_from_checkpoint`` continues
  every axis and the same W&B and MLflow runs, with or without
  ``restore_callback_states_from_checkpoint``, whatever decided to write the checkpoint.
- What people read shows our figures too (``rewrite_logs``): the ``epoch`` of each log entry the
  Trainer prints and keeps in ``state.log_history`` is ours, with ``samples`` and ``tokens`` beside
  it; ``state.epoch``, which the Trainer decides with, is never touched. On a terminal our fields
  go on the Trainer's own progress bar.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import weakref
from typing import Any

import torch

from ._checks import missing_extra, warn_once

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler, ExportableState, ProgressCallback
except ImportError as exc:  # one sentence naming the extra to install
    raise missing_extra(exc, "transformers", "hf", "stream_metrics.hf") from None

from . import conventions, distributed, flops, schema
from .amount import as_amount
from .backends import backend_names
from .display import ProgressDisplay
from .layout import detect as detect_layout
from .run import Run
from .schedule import Every, StepSchedules
from .takeover import (TakenOver, auto_backends, handler_from_stack, is_the_trainers_own, local_up_the_stack,
                       replaced_by, trainer_from_stack)

log = logging.getLogger("stream_metrics")

# Beside the checkpoints: the wall-clock of the latest row, so a resume after a crash never goes back.
PROGRESS_FILE = "stream_metrics_progress.json"


def _share_state(callback: "StreamMetricsCallback", original: "StreamMetricsCallback") -> None:
    """Make ``callback`` the same callback as ``original``: one set of attributes for both.

    Why: ``restore_callback_states_from_checkpoint=True`` builds a new callback from ``state()``'s
    args and drops the user's object from the Trainer; the user still holds theirs (``callback.run``,
    options that are not JSON). Sharing the attributes keeps one callback, whichever object is asked.
    """
    callback.__dict__ = original.__dict__


def _replaced_callback(frame) -> "StreamMetricsCallback | None":
    """The callback ``restore_callback_states_from_checkpoint`` replaces: transformers' ``_load_callback_state``
    builds the successor as ``type(callback)(**args)``, with the Trainer's own callback in ``callback``."""
    return local_up_the_stack("callback", StreamMetricsCallback, frame, 3)


def _rank_batch_size(loader, args) -> int | None:
    """The rows of one micro-batch of one rank: the loader's batch size (older transformers keep the
    checkpoint's, whatever the arguments say). None where a batch is split between several ranks
    (accelerate's ``split_batches`` with dispatched batches: how many rows each gets is its own rule)."""
    if distributed.world_size() > 1 and getattr(loader, "split_batches", False):
        return None
    return getattr(loader, "batch_size", None) or args.per_device_train_batch_size


class StreamMetricsCallback(TrainerCallback, ExportableState):
    """Log samples, tokens, estimated epochs and wall-clock with every Trainer row.

    Args:
        backend: ``"mlflow"``, ``"wandb"``, a list of both, ``"none"``, or ``"auto"`` (the default:
            the backends ``report_to`` names; else MLflow where installed, and W&B where it is
            installed and offline or has an API key).
        x_axis: the default x-axis: ``"samples"``, ``"tokens"``, ``"step"``, ``"epoch"``, ``"wall_clock"`` or
            ``"flops"`` (training FLOPs, counted from the Trainer's model: docs/flops.md).
        dataset_size: samples in one pass over the training data, where known, in the units
            ``progress/samples`` counts: a DPO pair is 2 (its chosen and rejected sequences), a GRPO
            prompt ``num_generations`` x ``num_iterations``.
        eval_every, save_every: an amount (``"500ksp"``, ``"50Mtok"``, ``"0.5ep"``, ``"30min"``): evaluate,
            or save a checkpoint, once each time the run crosses a multiple of it (docs/schedule.md).
        stop_at: an amount: stop training there, with a final checkpoint (``max_steps`` still applies).
        progress: show progress in samples and tokens, with an ETA (default: when the Trainer's bar shows).
        rewrite_logs: the Trainer's log entries (its printed lines, ``state.log_history``, what later
            callbacks such as a framework's logger see) carry our ``epoch``, with ``samples`` and
            ``tokens`` beside it (default True). False leaves them as the Trainer made them.
        **options: passed to ``stream_metrics.init`` (``mlflow_step``, ``project``, ``mlflow={...}``,
            ``wandb={...}``, ``flush_timeout``, ``pad_token_id``, ``peak_flops`` (FLOP/s of one device, for
            ``throughput/mfu``), ``flops_per_token``).

    >>> trainer = Trainer(model, args, train_dataset=stream,          # doctest: +SKIP
    ...                   callbacks=[StreamMetricsCallback(backend=["mlflow", "wandb"])])
    """

    _latest = None  # a weak reference to the last callback built by user code

    def __init__(self, backend="auto", x_axis: str = "samples", dataset_size=None, *,
                 finish_on_train_end: bool = True, saved_state: dict | None = None, eval_every=None,
                 save_every=None, stop_at=None, progress: bool | None = None, rewrite_logs: bool = True,
                 restored: bool = False, **options):
        original = None
        if restored:  # the callback this one succeeds; else the last one built (another caller's restore)
            original = _replaced_callback(sys._getframe(1)) or (
                StreamMetricsCallback._latest() if StreamMetricsCallback._latest else None)
        if original is not None:
            _share_state(self, original)
            return
        StreamMetricsCallback._latest = weakref.ref(self)
        # Amounts are checked now and kept as text (JSON-safe in the checkpoint's callback state).
        self.eval_every, self.save_every, self.stop_at = (
            None if a is None else str(as_amount(a)) for a in (eval_every, save_every, stop_at))
        if self.eval_every is not None:
            Every(self.eval_every)  # more than 0
        if self.save_every is not None:
            Every(self.save_every)
        self._schedules = StepSchedules(self.eval_every, self.save_every, self.stop_at)
        self.show_progress = progress
        self.rewrite_logs = rewrite_logs
        self.display: ProgressDisplay | None = None
        self._init_args = {"backend": backend, "x_axis": x_axis, "dataset_size": dataset_size,
                           "finish_on_train_end": finish_on_train_end, "eval_every": self.eval_every,
                           "save_every": self.save_every, "stop_at": self.stop_at, "progress": progress,
                           "rewrite_logs": rewrite_logs, **options}
        self.backend, self.x_axis, self.dataset_size = backend, x_axis, dataset_size
        self.options = options
        self.finish_on_train_end = finish_on_train_end
        self.saved_state = saved_state  # the state of the last checkpoint (set on restore too)
        self.run: Run | None = None
        self.added_by_autolog = False
        self._taken_over: list[str] = []
        self._handler: CallbackHandler | None = None
        self._opened_by_evaluate = False  # the run was opened by trainer.evaluate() before train()
        # Validate now, so a typo fails when the Trainer is built, not hours later.
        self._new_run(backend="none").finish()
        self._hook = None
        self._active: list = []
        self._sized = False
        self._batches_this_epoch = 0
        self._step_begun: tuple[Any, int] | None = None  # (TrainerState, its global_step) at on_step_begin
        self._mark_steps = False

    # ------------------------------------------------------------------ ExportableState
    def state(self) -> dict:
        """Stored in each checkpoint's trainer_state.json, when the checkpoint is written."""
        self._take_state("write")
        args = {k: v for k, v in self._init_args.items() if _json_safe(v)}
        args["restored"] = True
        return {"args": args, "attributes": {"saved_state": self.saved_state}}

    # ------------------------------------------------------------------ taking over
    def _take_over_integrations(self) -> None:
        handler = handler_from_stack()
        if handler is None:
            return
        self._handler = handler
        # backend="auto" logs to what report_to names, so it takes every integration over; a backend list
        # takes over its own only (report_to's others go on logging as the Trainer set them up).
        ours = None if self.backend == "auto" else backend_names(self.backend)
        for i, cb in enumerate(handler.callbacks):
            name = replaced_by(cb)
            if name and (ours is None or name in ours):
                handler.callbacks[i] = taken = TakenOver(cb)  # replaced in place: the handler is iterating
                if name not in self._taken_over:
                    self._taken_over.append(name)
                log.info("stream_metrics: the Trainer's %s is replaced by StreamMetricsCallback, which logs "
                         "to %s with the progress axes, into the process's active run; kept: %s",
                         type(cb).__name__, name, ", ".join(taken.kept + (
                             ["MLFLOW_TAGS (run tags)"] if name == "mlflow" and os.environ.get("MLFLOW_TAGS") else []))
                         or "nothing else (it only logged metrics)")

    def _log_first(self) -> None:
        """Stand right after the Trainer's own callbacks, so every callback that reads a log entry after
        this one (a framework's logger such as LLaMA-Factory's LogCallback, the Trainer's printer) sees
        our figures, however this callback was added: ``callbacks=[...]`` after the framework's own,
        ``autolog``, or restore_callback_states_from_checkpoint (which re-adds it at the very end).

        Safe while the handler iterates this event: the callbacks we move ahead of have had it, and
        the ones after us keep their order.
        """
        callbacks = self._handler.callbacks if self._handler is not None else []
        mine = next((i for i, cb in enumerate(callbacks) if cb is self), None)
        if mine is None:
            return
        first = 0  # the first place after the Trainer's flow callback and reporting integrations
        while first < mine and is_the_trainers_own(callbacks[first]):
            first += 1
        if first < mine:
            callbacks.insert(first, callbacks.pop(mine))

    def on_init_end(self, args, state, control, **kwargs):
        self._take_over_integrations()

    def _check_eval_dataset(self) -> None:
        """eval_every needs something to evaluate on: refused when train() begins (the eval_dataset may be
        set on the Trainer after it is built), not at the first boundary, hours later."""
        if self.eval_every is None:
            return
        trainer = trainer_from_stack()
        if trainer is not None and getattr(trainer, "eval_dataset", None) is None:
            raise ValueError(f"StreamMetricsCallback(eval_every={self.eval_every!r}) evaluates on the Trainer's "
                             "eval_dataset, and this Trainer has none: pass eval_dataset= to the Trainer, or leave "
                             "eval_every out")

    # ------------------------------------------------------------------ training
    def _give_way(self) -> bool:
        """autolog's callback gives way to a StreamMetricsCallback added to the Trainer after it was built
        (``trainer.add_callback``): one run per backend, not two. It puts a callback that does nothing
        in its place (the handler may be iterating its list)."""
        callbacks = self._handler.callbacks if self._handler is not None else []
        if not self.added_by_autolog or not any(isinstance(cb, StreamMetricsCallback) and cb.__dict__ is not
                                                self.__dict__ for cb in callbacks):
            return False
        for i, cb in enumerate(callbacks):
            if cb is self:
                callbacks[i] = TrainerCallback()
        log.info("stream_metrics: this Trainer was given a StreamMetricsCallback after autolog gave it one: "
                 "autolog's steps aside")
        return True

    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None,
                       **kwargs):
        self._take_over_integrations()
        if self._give_way():
            return
        self._log_first()
        self._check_eval_dataset()
        interrupted = self._hook is not None  # the last train() raised: on_train_end never came
        if self._hook is not None:
            self._hook.remove()  # or every batch would be counted twice from now on
            self._hook = None
        resume = self._resume_state(state)
        if self._opened_by_evaluate and resume is not None and self.run is not None and not self.run.finished:
            log.warning("stream_metrics: trainer.evaluate() before train(resume_from_checkpoint=...) logged to runs "
                        "of its own (%s), at progress 0 and with the weights before the checkpoint's were loaded; "
                        "the resumed training continues the checkpoint's runs", self.run.run_ids)
        if self._opened_by_evaluate and resume is None and self.run is not None and not self.run.finished:
            # trainer.evaluate() before train() opened the runs at progress 0: training goes on in them.
            self.run.watch(train_dataloader)
        else:
            if self.run is not None and not self.run.finished:
                if interrupted:
                    log.warning("stream_metrics: train() began again after a train() that raised (an error, a "
                                "KeyboardInterrupt, or auto_find_batch_size retrying with a smaller batch): that "
                                "attempt's runs are closed as FAILED, and this train() logs to new ones")
                self.run.finish("FAILED" if interrupted else "FINISHED")  # a run left open by an earlier train()
            self.run = self._new_run(args, model=model, processing_class=processing_class, dataset=train_dataloader,
                                     resume=resume)
        self._opened_by_evaluate = False
        if resume is not None and state.global_step > 0:
            # Where the Trainer starts the data again: from the start (ignore_data_skip), or past the
            # batches of the steps done, in this session's batch size and accumulation (which may not be
            # the checkpoint's). Rows as this rank counts them (the checkpoint's are rank 0's): each
            # rank's own micro-batches, as the loader hands them to it.
            batch_size = _rank_batch_size(train_dataloader, args)
            if args.ignore_data_skip or batch_size is not None:
                self.run.resume_data_at(0 if args.ignore_data_skip else
                                        state.global_step * args.gradient_accumulation_steps * batch_size)
        self._sized = self.run.probe.length is not None
        self._step_begun = None
        # transformers' JIT checkpoint on SIGTERM may be written before a step's optimizer step: mark
        # each step's start so it holds the counts as of there (on_step_begin, _take_state).
        self._mark_steps = bool(getattr(args, "enable_jit_checkpoint", False))
        self.run.watch_passes()  # the Trainer's epochs are seen to end (on_epoch_end)
        self._step(state)
        self._active = conventions.make_active(self.run)  # user's wandb.log / mlflow.log_* land in our runs
        active = self._active
        self.run.at_finish(lambda status: conventions.end_active(active, status))
        if model is not None:
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        self._say_if_labels_skip_the_forward()
        self._begin_display(args, state)

    @staticmethod
    def _say_if_labels_skip_the_forward() -> None:
        """Loss tokens are counted from the labels the model's forward gets; a Trainer with label
        smoothing or a ``compute_loss_func`` takes them out of the batch before it (transformers' and
        TRL's ``compute_loss``), so the rows carry no ``progress/loss_tokens``: say why, once."""
        trainer = trainer_from_stack()
        why = [name for name, attribute in (("label_smoothing_factor", "label_smoother"),
                                            ("compute_loss_func", "compute_loss_func"))
               if getattr(trainer, attribute, None) is not None]
        if why:
            warn_once("labels-before-forward", f"this Trainer ({' and '.join(why)}) takes the labels out of each "
                                               "batch before the model's forward, where stream_metrics counts, so "
                                               "progress/loss_tokens is left out of the rows (samples and tokens "
                                               "are counted as usual)")

    def _new_run(self, args=None, *, model=None, processing_class=None, dataset=None, resume=None,
                 backend=None) -> Run:
        """The one place a Run is built: at train begin, for an evaluation outside train(), and (with
        ``backend="none"`` and no ``args``) to check the options when the callback is made."""
        options = dict(self.options)
        if args is not None:
            options.setdefault("pad_token_id", _pad_token_id(processing_class, model))
            options.setdefault("name", args.run_name if args.run_name != args.output_dir else None)
            options.setdefault("config", _hyperparameters(args, model))
            options.setdefault("model", model)  # FLOPs from its weights and config (flops.py)
            options.setdefault("precision", flops.trainer_precision(args))  # for the peak FLOP/s behind MFU
            # Tensor/context/sequence parallelism stated in the arguments or the model: count each batch once.
            options.setdefault("layout", detect_layout(args, model))
            if args.output_dir and distributed.is_main():
                os.makedirs(args.output_dir, exist_ok=True)
                options.setdefault("progress_file", os.path.join(args.output_dir, PROGRESS_FILE))
        if backend is None:
            backend = self.backend
            if backend == "auto":
                backend = auto_backends(self._taken_over, args.report_to if args is not None else None)
        return Run(backend=backend, x_axis=self.x_axis, dataset_size=self.dataset_size, dataset=dataset,
                   resume=resume, **options)

    def _resume_state(self, state):
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(stored, list):
            stored = stored[0] if stored else None
        saved = ((stored or {}).get("attributes") or {}).get("saved_state")
        if saved is None and state.global_step > 0:
            saved = self.saved_state
        if saved is None and state.global_step > 0:
            log.warning("stream_metrics: resuming at step %d from a checkpoint without stream_metrics state; "
                        "the progress axes start again from zero", state.global_step)
        taken_at = (saved.get("progress") or {}).get("step") if isinstance(saved, dict) else None
        if state.global_step > 0 and type(taken_at) is int and taken_at != state.global_step:
            # Several ranks take the state where they all pass (_take_state): a checkpoint written
            # elsewhere (transformers' JIT checkpoint, a save asked for by a callback after this one)
            # holds the state of an earlier step.
            log.warning("stream_metrics: the checkpoint of step %d holds stream_metrics' counts as of step %d "
                        "(a checkpoint written on several ranks away from a step's end that saves, such as "
                        "transformers' JIT checkpoint on SIGTERM): the progress axes go on from those counts, so "
                        "they leave out the data of the %d step(s) between", state.global_step, taken_at,
                        state.global_step - taken_at)
        return saved if state.global_step > 0 else None

    def _count(self, module, args, kwargs):
        # The forward pre-hook: every training micro-batch, on its device. No host sync here. Only
        # forwards that train count: not a no-grad reference pass in train mode (DPO without a
        # reference model), not `generate` (no_grad) in GRPO/PPO, not evaluation (module.training False).
        if module.training and torch.is_grad_enabled() and self.run is not None:
            self._batches_this_epoch += 1
            self.run.update(kwargs if kwargs else (args[0] if args else None))

    def _step(self, state) -> None:
        run = self.run
        assert run is not None  # called once a run is made
        run.set_step(state.global_step)
        if self._sized:
            run.set_epoch(state.epoch or 0.0)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._batches_this_epoch = 0

    def on_epoch_end(self, args, state, control, **kwargs):
        # The loader ran out before max_steps: a whole pass over the data has ended. (When the
        # Trainer stops at max_steps instead, the pass has not ended, as far as anyone can tell.)
        if self.run is not None and self._batches_this_epoch and not control.should_training_stop:
            self.run.end_pass()
        if self.run is not None:
            self._step(state)
            self._take_state("epoch_end", control)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.run is not None and self._mark_steps:
            self.run.tally.mark()  # a few object copies per optimizer step; no device op
            self._step_begun = (state, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.run is None:
            return
        self._step(state)
        self._apply_schedules(control, state.global_step)
        self._take_state("step_end", control)

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        # trainer.predict() logs nothing itself (the Trainer's W&B integration logged its test_* figures
        # here): they go into the run as test/<name>, the dict predict() returns left as it is.
        if metrics:
            self.on_log(args, state, control, logs=dict(metrics), **kwargs)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.run is not None and not self.run.finished:
            self._step(state)
            self._take_state("evaluate", control)

    def _take_state(self, event: str, control=None) -> None:
        """The one rule for when the state a checkpoint holds is taken (``saved_state``).

        One process: when the checkpoint is written (``state()``), so whatever decided to write it (a
        schedule, ``save_strategy="best"`` after an evaluation, another callback), it holds the state
        as of then. Several ranks: ``state()`` runs on rank 0 alone while ``state_dict()`` brings every
        rank together, so the state is taken where every rank passes before a checkpoint can be
        written: the end of a step or epoch that is to save, and every evaluation (``"best"`` decides
        after it; nothing trains between the evaluation and the save).
        """
        if self.run is None or self.run.finished:
            return
        if distributed.world_size() == 1:
            due = event == "write"
        else:
            due = event == "evaluate" or (event in ("step_end", "epoch_end") and control.should_save)
        if not due:
            return
        begun = self._step_begun
        # Written in the middle of a step, before its optimizer step (the JIT checkpoint's
        # on_pre_optimizer_step): the checkpoint's weights and step are as of the step's start, and
        # its resume trains the step's micro-batches again, so its counts are as of there too.
        mid_step = (event == "write" and begun is not None and begun[0].global_step == begun[1]
                    and self.run.tally.counted_since_mark())
        with self.run.tally.as_at_mark() if mid_step else contextlib.nullcontext():
            self.saved_state = self.run.state_dict()

    def on_log(self, args, state, control, logs=None, model=None, processing_class=None, **kwargs):
        if not logs or (self.run is None and self._give_way()):
            return
        if self.run is None or self.run.finished:
            # An evaluation outside train(): before it, its row opens the runs at progress 0 and training
            # goes on in them; after it, the row goes into the same runs, where training ended.
            self._opened_by_evaluate = self.run is None
            self.run = self._new_run(args, model=model, processing_class=processing_class, resume=self.saved_state)
            self._sized = False
        self._step(state)
        metrics, summary = {}, {}
        for key, value in logs.items():
            if key in schema.HF_DROPPED_KEYS:
                continue
            if key in schema.HF_SUMMARY_KEYS:
                summary[key] = value
            else:
                metrics[schema.hf_metric_name(key)] = value
        progress = None
        if metrics:
            progress = self.run.log(metrics)
            self._show(progress)
        if summary:
            self.run.summary(summary)
        if self.rewrite_logs:
            # Every rank logs; on a summary-only entry this reads the progress (one gather) once per training.
            self._rewrite(logs, state, progress if progress is not None else self.run.progress)

    def _rewrite(self, logs: dict, state, progress) -> None:
        """Our epoch, samples and tokens in the entry the Trainer logged, where people read it.

        ``logs`` is what the callbacks after this one see (the console printer, LLaMA-Factory's
        LogCallback); ``state.log_history[-1]`` is the same entry as the Trainer keeps it (a copy
        with ``step`` added), which ``trainer_state.json`` and the frameworks' loggers read.
        ``state.epoch`` is left alone: the Trainer decides with it.
        """
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and (entry.get("step") != state.global_step or set(entry) - {"step"} != set(logs)):
            entry = None  # not this entry (a subclass logged differently): leave the history alone
        axes = progress.axes()
        # An evaluation's entry is also the dict evaluate() returns, which hyperparameter search's
        # default objective sums (less epoch and the timings): only the epoch the Trainer put in it is
        # replaced there; samples and tokens go into the history alone.
        evaluation = any(key.startswith(("eval_", "test_")) for key in logs)
        for log_key, axis in schema.HF_LOG_AXES.items():
            if axis in axes:
                if not evaluation or log_key in logs:
                    logs[log_key] = axes[axis]
                if entry is not None:
                    entry[log_key] = axes[axis]

    def run_backends(self) -> list[str]:
        """The backends the run logs to (after ``"auto"`` is resolved)."""
        return self.run.backends if self.run else []

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.run is None:
            return
        self._step(state)
        self.saved_state = self.run.state_dict()  # every rank ends here: what a later evaluate() goes on from
        if self.display is not None:  # the last line or bar is where training ended, not the last row
            self.display.update(self.run.last_progress)
        self._end_display()
        if self.finish_on_train_end:
            self.run.finish()  # and pops the active runs (at_finish)
            for line in self.run.where():
                log.info("stream_metrics: %s", line)

    # ------------------------------------------------------------------ schedules and display
    def _apply_schedules(self, control, step: int) -> None:
        """eval_every / save_every / stop_at: set the Trainer's control flags when an amount is crossed
        (schedule.StepSchedules: the ranks sync only near a boundary, all at the same step)."""
        run = self.run
        assert run is not None  # on_step_end checked
        if not self._schedules:
            # Without a schedule the ranks meet at rows only (on_log shows those); a lone process may
            # read its counts for the display. (display.ready() differs between ranks: never a collective.)
            if self.display is not None and self.display.ready() and distributed.world_size() == 1:
                self._show(run.progress)
            return
        evaluate, save, stop, synced = self._schedules.decide(run, step)
        if evaluate:
            control.should_evaluate = True
        if save:
            control.should_save = True
        if stop:
            control.should_training_stop = True
            control.should_save = True  # the final checkpoint, at the amount
        if synced is not None:
            self._show(synced)
        elif self.display is not None and self.display.ready() and distributed.world_size() == 1:
            self._show(run.progress)

    def _begin_display(self, args, state) -> None:
        show = (not args.disable_tqdm) if self.show_progress is None else self.show_progress
        self._end_display()
        if show:
            targets = {"stop_at": self.stop_at, "max_steps": (state.max_steps, "ba") if state.max_steps > 0 else None}
            self.display = ProgressDisplay(targets=targets, bar=self._trainer_bar)

    def _trainer_bar(self):
        """The Trainer's own progress bar (ProgressCallback's), once it exists: ours go on it as a postfix."""
        for callback in self._handler.callbacks if self._handler is not None else ():
            if isinstance(callback, ProgressCallback):
                return callback.training_bar
        return None

    def _show(self, progress) -> None:
        if self.display is not None:
            self.display.update(progress)

    def _end_display(self) -> None:
        if self.display is not None:
            self.display.close()
            self.display = None


def _json_safe(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _pad_token_id(processing_class, model):
    """The pad token's id; -1 (no token's) where the Trainer's tokenizer has no pad token, so no batch
    can hold padding by token (GPT-2 with DataCollatorWithFlattening: a one-token example at a row's
    edge is an example); None where nothing says (every reading of padding stays open)."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    for owner in (processing_class, tokenizer, getattr(model, "config", None)):
        pad = getattr(owner, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    if tokenizer is not None and hasattr(tokenizer, "pad_token_id") and hasattr(tokenizer, "convert_tokens_to_ids"):
        return -1
    return None


def _hyperparameters(args, model) -> dict:
    # TrainingArguments.to_dict() masks hub_token already; redact_config (in Run) catches the rest.
    config = args.to_dict()
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "to_dict"):
        config["model"] = {k: v for k, v in model_config.to_dict().items() if _json_safe(v)}
    return config
