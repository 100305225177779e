"""The start-up hook of ``stream-metrics run``: autolog in every Python process COMMAND starts.

``stream-metrics run`` puts this folder first on ``PYTHONPATH``, so Python's ``site`` module
imports this file at start-up in COMMAND and in every Python process it starts (torchrun and
accelerate workers, ``llamafactory-cli``, ``trl``, ``python -m ...``). It must cost next to nothing
in processes that never train: it imports neither torch nor transformers, nor even stream_metrics.
It only watches for ``transformers.trainer``; when a process imports it, ``stream_metrics.autolog``
is switched on there with the options in the ``STREAM_METRICS_*`` environment variables (which
``stream-metrics run``'s flags set, and a user may set directly). Then the ``sitecustomize`` this
file shadows, if any, runs too.

Also imported as ``stream_metrics._startup.sitecustomize`` by autolog.py and cli.py, for
``when_imported`` and ``ENVIRONMENT``; only the copy Python runs at start-up (``__name__ ==
"sitecustomize"``) installs anything.
"""
from __future__ import annotations

import importlib.machinery
import os
import sys

# autolog's options and the environment variables that carry them, spelled here only (cli.py imports it).
ENVIRONMENT = {
    "backend": "STREAM_METRICS_BACKEND",          # mlflow, wandb, "mlflow,wandb" or none
    "x_axis": "STREAM_METRICS_X_AXIS",
    "dataset_size": "STREAM_METRICS_DATASET_SIZE",
    "eval_every": "STREAM_METRICS_EVAL_EVERY",
    "save_every": "STREAM_METRICS_SAVE_EVERY",
    "stop_at": "STREAM_METRICS_STOP_AT",
    "mlflow_step": "STREAM_METRICS_MLFLOW_STEP",
    "name": "STREAM_METRICS_NAME",
}
TRAINER_MODULE = "transformers.trainer"


def options_from_environment(environ=os.environ) -> dict:
    """The autolog options set in ``STREAM_METRICS_*`` variables; the values are checked by autolog."""
    options = {}
    for option, variable in ENVIRONMENT.items():
        value = environ.get(variable, "").strip()
        if not value:
            continue
        if option == "backend" and "," in value:
            value = [name.strip() for name in value.split(",") if name.strip()]
            if not value:
                raise ValueError(f"{variable}={environ.get(variable)!r} names no backend: set it to mlflow, wandb, "
                                 "'mlflow,wandb' or none")
        elif option == "dataset_size":
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"{variable}={value!r} is not a whole number of examples: set it to, "
                                 "e.g., 50000, or unset it") from None
        options[option] = value
    return options


class _AfterImport:
    """A meta path finder that runs ``then(module)`` right after one named module has executed.

    It finds the module with the finders after it, so the module loads exactly as it would have;
    its loader is wrapped for that one load only, then put back.
    """

    def __init__(self, name: str, then):
        self.name, self.then = name, then
        self._finding = False

    def find_spec(self, fullname, path=None, target=None):
        # Another finder of this kind (autolog() under `stream-metrics run`, or two installs' hooks)
        # asks the finders after it, this one among them: answer None then, or each would ask the
        # other for ever. The outer one gets the spec with the inner one's loader; both run.
        if fullname != self.name or self._finding:
            return None
        self._finding = True
        try:
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._finding = False
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        self.cancel()  # once: the module is loaded once per process
        # A loader by its methods: importlib.abc is not imported in every process at start-up.
        spec.loader = _ThenLoader(spec.loader, self.then)  # type: ignore[assignment]
        return spec

    def cancel(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


class _ThenLoader:
    def __init__(self, loader, then):
        self.loader, self.then = loader, then

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # The module's own loader goes back before its code runs (inspect, importlib.resources use it).
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.then(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def when_imported(name: str, then) -> _AfterImport:
    """Run ``then(module)`` once the module ``name`` is first imported; ``.cancel()`` undoes it."""
    hook = _AfterImport(name, then)
    sys.meta_path.insert(0, hook)
    return hook


def _autolog_from_environment(module) -> None:
    try:
        from stream_metrics.autolog import autolog

        autolog(**options_from_environment())
    except Exception as exc:  # inside an import of transformers: training goes on, and says why
        print(f"stream_metrics: autolog is off in this process: {exc}", file=sys.stderr)


def _run_the_shadowed_sitecustomize() -> None:
    # The first sitecustomize on sys.path after this folder is the one Python would have run.
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    from importlib.util import module_from_spec  # only here: it costs more than the rest of this file

    module = module_from_spec(spec)
    sys.modules["sitecustomize"] = module  # `import sitecustomize` later finds the user's, as before
    spec.loader.exec_module(module)


if __name__ == "sitecustomize":
    try:
        options_from_environment()  # a bad value is said now, in every process, not at the Trainer
        if TRAINER_MODULE in sys.modules:
            _autolog_from_environment(sys.modules[TRAINER_MODULE])
        else:
            when_imported(TRAINER_MODULE, _autolog_from_environment)
    except Exception as exc:  # never stop a process from starting; say why autolog is off
        print(f"stream_metrics: autolog is off in this process: {exc}", file=sys.stderr)
    _run_the_shadowed_sitecustomize()
