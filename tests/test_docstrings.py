"""The examples in the library's docstrings run as written (doctest): they are the first code a
reader copies. Examples marked ``# doctest: +SKIP`` need a training job or a backend and are shown only."""
from __future__ import annotations

import doctest
import importlib
import os

import pytest

import stream_metrics

PACKAGE = os.path.dirname(stream_metrics.__file__)


def modules_with_examples() -> list[str]:
    names = []
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py") and file != "__main__.py":
                with open(os.path.join(folder, file), encoding="utf-8") as f:
                    if ">>> " not in f.read():
                        continue
                relative = os.path.relpath(os.path.join(folder, file[:-3]), os.path.dirname(PACKAGE))
                names.append(relative.replace(os.sep, ".").removesuffix(".__init__"))
    return sorted(names)


MODULES = modules_with_examples()


def test_the_examples_are_found():
    assert {"stream_metrics.epoch", "stream_metrics.tally", "stream_metrics.run"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run_as_written(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
