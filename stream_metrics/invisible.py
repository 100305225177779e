"""Invisible to training: our randomness never comes from the training's random generators.

A training run's reproducibility rests on the global generators (``random``, ``numpy.random``,
torch's): a data collator masking spans, a shuffle, dropout. Anything that draws from them, on any
thread, shifts every later draw, and a draw from a background thread lands at a moment that
depends on timing. So stream_metrics never draws from or seeds them: what needs chance (a run
name) uses a private generator seeded from the operating system, and MLflow, which draws from the
global ``random`` on its own (default run names, retry jitter, its telemetry thread), is given a
name and its own generator. Nothing here reseeds, saves or restores a global generator.

>>> from stream_metrics.invisible import run_name
>>> name = run_name()
>>> len(name.split("-")) == 3 and name.split("-")[2].isdigit()
True
"""
from __future__ import annotations

import os
import random
import sys

# Seeded from the operating system, never from the training's seed: two runs of a seeded training
# still get different names.
_PRIVATE = random.Random(os.urandom(32))

_ADJECTIVES = ("amber", "brisk", "calm", "dapper", "eager", "fleet", "gentle", "hardy", "keen", "lucid",
               "mellow", "nimble", "patient", "quiet", "rapid", "steady", "tidy", "upbeat", "vivid", "witty")
_NOUNS = ("otter", "heron", "falcon", "badger", "lynx", "marten", "osprey", "panda", "quokka", "raven",
          "salmon", "tapir", "urchin", "vole", "walrus", "wren", "yak", "zebra", "ibis", "gecko")

# MLflow modules that call the global ``random`` at our calls or on threads of their own: default
# run names, HTTP retry jitter (Databricks SDK path; urllib3 < 2), the SQL store's retry jitter,
# and the telemetry thread's rollout draw. Each module's ``random`` is looked up when it draws.
_MLFLOW_MODULES = ("mlflow.utils.name_utils", "mlflow.utils.rest_utils", "mlflow.utils.request_utils",
                   "mlflow.store.tracking.sqlalchemy_store", "mlflow.telemetry.client")


def run_name() -> str:
    """A run name like ``"steady-heron-417"``, from a generator the training never seeds."""
    return f"{_PRIVATE.choice(_ADJECTIVES)}-{_PRIVATE.choice(_NOUNS)}-{_PRIVATE.randrange(1000)}"


def keep_mlflow_off_the_global_random() -> None:
    """Give MLflow's draws a generator of their own, so they never consume the training's.

    With urllib3 2, MLflow's HTTP retries wait with urllib3's jitter, drawn from the global
    ``random`` inside urllib3 (which other libraries share): that jitter is turned off unless the
    user set ``MLFLOW_HTTP_REQUEST_BACKOFF_JITTER``; the exponential backoff stays.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    for name in _MLFLOW_MODULES:
        module = sys.modules.get(name)
        # Only the name that is the global module is replaced: a module-level ``random`` MLflow
        # uses only for draws, now answered by our generator with the same methods.
        if module is not None and getattr(module, "random", None) is random:
            module.__dict__["random"] = _PRIVATE
