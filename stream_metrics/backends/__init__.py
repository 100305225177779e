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


__all__ = ["Backend", "Row", "RunInfo", "backend_class", "backend_names", "create"]
