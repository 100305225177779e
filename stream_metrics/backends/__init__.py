"""Tracking backends: one file each, behind the small interface in base.py.

A backend's library is imported only when that backend is asked for, so nobody pays for one they
do not use, and a missing one is one clear sentence naming the extra to install.
"""
from __future__ import annotations

from .. import schema
from .base import Backend, Row, RunInfo


def backend_names(backend) -> list[str]:
    """``"mlflow"``, ``"wandb"``, a list of both, or ``"none"`` -> a checked list of names."""
    if backend is None or backend == "none":
        return []
    names = [backend] if isinstance(backend, str) else list(backend)
    for name in names:
        if name not in schema.BACKENDS:
            raise ValueError(f"backend={name!r} is not known: use 'mlflow', 'wandb', a list of both, or 'none'")
    return list(dict.fromkeys(names))


def import_wandb():
    """The ``wandb`` package, or one ImportError saying what to install.

    Where W&B is not installed, ``import wandb`` still succeeds when the working directory holds a
    ``wandb/`` folder of runs (a namespace package with no ``init``); say so, rather than fail later
    on a missing attribute.
    """
    try:
        import wandb
    except ImportError:
        raise ImportError("the wandb backend needs Weights & Biases: pip install 'stream_metrics[wandb]'") from None
    if not hasattr(wandb, "init"):
        paths = list(getattr(wandb, "__path__", []))
        folders = (f"the folder {paths[0]}" if len(paths) == 1 else f"the folders {', '.join(paths)}" if paths
                   else "a wandb folder")
        raise ImportError(f"'import wandb' found {folders}, not Weights & Biases: the package is not "
                          "installed (pip install 'stream_metrics[wandb]'), and a folder named wandb on the path "
                          "stands in for it")
    return wandb


def backend_class(name: str) -> type[Backend]:
    """The class of the backend called ``name`` (its library is imported here, on first use)."""
    if name == "mlflow":
        from .mlflow import MLflowBackend

        return MLflowBackend
    if name == "wandb":
        from .wandb import WandbBackend

        return WandbBackend
    raise ValueError(f"backend={name!r} is not known")


def create(name: str, options: dict | None = None) -> Backend:
    return backend_class(name)(**(options or {}))


__all__ = ["Backend", "Row", "RunInfo", "backend_class", "backend_names", "create", "import_wandb"]
