"""``stream_metrics.autolog()``: every Hugging Face Trainer built afterwards gets the callback.

    import stream_metrics

    stream_metrics.autolog(backend="mlflow", eval_every="0.5ep")
    trainer = SFTTrainer(...)        # any Trainer or subclass: TRL's, LLaMA-Factory's, your own
    trainer.train()                  # logged with samples, tokens and estimated epochs

How: ``Trainer.__init__`` is wrapped once (a subclass's ``__init__`` calls it through ``super()``),
and ``StreamMetricsCallback(**options)`` is put first in the ``callbacks`` the Trainer is given,
unless they hold one already. First, because a framework's own logger comes after the callbacks it
is handed (LLaMA-Factory appends its LogCallback, which writes ``trainer_log.jsonl``): ours must
update a log entry before that logger reads it. The Trainer's own default and reporting callbacks
still come before every callback it is given.

transformers is not imported here: if it has not been imported yet, the wrap happens when
``transformers.trainer`` is (``stream-metrics run`` relies on that, so processes that never
train pay nothing).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys

from ._startup.sitecustomize import TRAINER_MODULE, when_imported

log = logging.getLogger("stream_metrics")

_options: dict | None = None   # the callback's options while autolog is on
_pending = None                # the import hook, while transformers.trainer is not imported yet
_paused = 0                    # > 0 while a Trainer is built for a callback's own use (paused())
_WRAPPED = "__stream_metrics_autolog_original__"


class _UntilConfigured(logging.StreamHandler):
    """Our INFO lines (what was taken over, where the runs are) on stderr, while the program has no
    logging of its own: a program run with no code changed (``stream-metrics run``, ``autolog``)
    often configures none, and Python would drop them. Once the program gives the root logger a
    handler, the lines go there instead (by propagation), never twice."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def _show_info_lines() -> None:
    if any(isinstance(h, _UntilConfigured) for h in log.handlers):
        return
    log.addHandler(_UntilConfigured())
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)


def autolog(disable: bool = False, **options) -> None:
    """Give every Hugging Face ``Trainer`` built from now on a ``StreamMetricsCallback(**options)``.

    Args:
        disable: ``True`` undoes it: Trainers built afterwards get no callback from autolog.
        **options: the callback's own (``backend``, ``x_axis``, ``dataset_size``, ``eval_every``,
            ``save_every``, ``stop_at``, ``mlflow_step``, ``name``, ...); checked now.

    Calling it again replaces the options (a Trainer still gets one callback). A Trainer given a
    ``StreamMetricsCallback`` by its caller keeps that one and gets no second.

    >>> import stream_metrics
    >>> stream_metrics.autolog(backend="none", x_axis="tokens")
    >>> stream_metrics.autolog(disable=True)
    """
    global _options, _pending
    if disable:
        _options = None
        if _pending is not None:
            _pending.cancel()
            _pending = None
        trainer_module = sys.modules.get(TRAINER_MODULE)
        if trainer_module is not None:
            _unwrap(trainer_module.Trainer)
        return
    check_options(options)
    _options = dict(options)
    _show_info_lines()
    trainer_module = sys.modules.get(TRAINER_MODULE)
    if trainer_module is not None and hasattr(trainer_module, "Trainer"):
        _wrap(trainer_module)
    elif _pending is None:
        _pending = when_imported(TRAINER_MODULE, _wrap)


def check_options(options: dict) -> None:
    """Fail now, with the callback's own message, on an option it would refuse at the first Trainer."""
    from .amount import as_amount
    from .backends import backend_names
    from .run import Run

    backend = options.get("backend", "auto")
    if backend != "auto":
        backend_names(backend)
    for name in ("eval_every", "save_every", "stop_at"):
        if options.get(name) is not None:
            as_amount(options[name])
    Run(backend="none", **{k: options[k] for k in ("x_axis", "dataset_size", "mlflow_step") if k in options}).finish()


def _wrap(trainer_module) -> None:
    global _pending
    _pending = None
    trainer = trainer_module.Trainer
    if getattr(trainer.__init__, _WRAPPED, None) is not None:
        return  # wrapped already: the options in effect are read at each Trainer's construction
    original = trainer.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if _options is not None and not _paused:
            args, kwargs = _with_callback(signature, self, args, kwargs)
        original(self, *args, **kwargs)

    setattr(__init__, _WRAPPED, original)
    trainer.__init__ = __init__
    log.debug("stream_metrics: autolog is on for %s.%s", trainer.__module__, trainer.__qualname__)


@contextlib.contextmanager
def paused():
    """Trainers built inside get no callback: e.g. the one W&B's integration builds only to save a model."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def _unwrap(trainer) -> None:
    original = getattr(trainer.__init__, _WRAPPED, None)
    if original is not None:
        trainer.__init__ = original


def _with_callback(signature, trainer, args, kwargs):
    from .hf import StreamMetricsCallback

    bound = signature.bind_partial(trainer, *args, **kwargs)
    given = list(bound.arguments.get("callbacks") or [])
    if any(isinstance(cb, StreamMetricsCallback)
           or (isinstance(cb, type) and issubclass(cb, StreamMetricsCallback)) for cb in given):
        return args, kwargs
    options = _options or {}
    callback = StreamMetricsCallback(**options)
    callback.added_by_autolog = True  # gives way to one the user adds later (trainer.add_callback)
    log.info("stream_metrics: autolog gives %s a StreamMetricsCallback(%s)", type(trainer).__name__,
             ", ".join(f"{k}={v!r}" for k, v in options.items()))
    bound.arguments["callbacks"] = [callback, *given]  # a new list: the caller's is left as it was
    return bound.args[1:], bound.kwargs
