"""The Trainer's own W&B and MLflow callbacks, taken over by ``StreamMetricsCallback`` (hf.py).

Where ``report_to`` names them, they are taken out of the callback list so that every metric is
logged once, with the progress axes; ``TakenOver`` stands in their place and keeps doing what users
set them to do besides metrics (conventions.py). Without a backend named, the callback logs to the
backends they would have used (``auto_backends``).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from types import FrameType

from ._checks import missing_extra

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback
except ImportError as exc:  # one sentence naming the extra to install
    raise missing_extra(exc, "transformers", "hf", "stream_metrics.hf") from None

from . import conventions, schema
from .autolog import paused as autolog_paused

# The Trainer's built-in integrations that would log the same metrics a second time.
_INTEGRATIONS = {"WandbCallback": "wandb", "MLflowCallback": "mlflow"}


class TakenOver(TrainerCallback):
    """Stands where a built-in integration stood (keeps the handler's list length), doing only what
    users set it to do besides metrics: WANDB_LOG_MODEL, HF_MLFLOW_LOG_ARTIFACTS (conventions.py)."""

    def __init__(self, original):
        self.original = original
        self.kept = conventions.kept_duties(original)
        if self.kept:
            conventions.artifacts_only(original)

    def on_save(self, args, state, control, **kwargs):
        if self.kept:
            self.original.on_save(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.kept:  # before StreamMetricsCallback's own on_train_end: the run is still open
            with autolog_paused():  # W&B builds a Trainer only to save the model: no callback for it
                self.original.on_train_end(args, state, control, **kwargs)

    def __repr__(self):
        return f"<{type(self.original).__name__} replaced by StreamMetricsCallback>"


def handler_from_stack() -> CallbackHandler | None:
    """The Trainer's CallbackHandler, found by walking up from the event being handled.

    Why: nothing public gives a callback its handler or its Trainer (events pass the model,
    optimizer and loaders only), and two things need the handler: taking the built-in W&B/MLflow
    callbacks out (so every metric is logged once) and finding the Trainer's progress bar. Its
    ``call_event`` is a few frames up, as ``self``; None when it is not (then nothing is taken over).
    """
    return local_up_the_stack("self", CallbackHandler, sys._getframe(1), 8)


def trainer_from_stack():
    """The Trainer whose event is being handled (a few frames above the handler), or None."""
    from transformers import Trainer

    return local_up_the_stack("self", Trainer, sys._getframe(1), 12)


def local_up_the_stack(name: str, kind: type, frame: FrameType | None, depth: int):
    """The first local ``name`` of type ``kind`` in ``frame`` and the ``depth - 1`` frames above it, or None."""
    for _ in range(depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get(name)
        if isinstance(candidate, kind):
            return candidate
        frame = frame.f_back
    return None


def is_the_trainers_own(callback) -> bool:
    """The Trainer's flow callback and the reporting integrations ``report_to`` adds (they come first)."""
    return isinstance(callback, (DefaultFlowCallback, TakenOver)) or \
        type(callback).__module__.startswith("transformers.integrations")


def auto_backends(taken_over: list[str], report_to) -> list[str]:
    names = list(taken_over) or [n for n in schema.BACKENDS if n in (report_to or [])]
    if names:
        return names
    if importlib.util.find_spec("mlflow"):
        names.append("mlflow")
    if importlib.util.find_spec("wandb") and (os.environ.get("WANDB_MODE") in ("offline", "dryrun")
                                              or os.environ.get("WANDB_API_KEY")):
        names.append("wandb")
    return names


def replaced_by(callback) -> str | None:
    """The backend a built-in integration logs to, where ``callback`` is one (else None)."""
    return _INTEGRATIONS.get(type(callback).__name__)
