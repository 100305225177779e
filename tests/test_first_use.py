"""What a new user met on a first try: a missing extra, a ./wandb folder, a map-style dataset, an install.

Each missing library is really missing in a fresh interpreter: blocked in ``sys.modules`` (Python
then raises ImportError for it), or left out of the path the interpreter sees.
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from conftest import ROOT


def python(code: str, *, cwd, flags=(), path=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path}, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("blocked, code", [
    ("transformers", "from stream_metrics.hf import StreamMetricsCallback"),
    ("accelerate", "from stream_metrics.accelerate import StreamMetricsTracker"),
])
def test_an_integration_without_its_library_names_the_extra_to_install(workdir, blocked, code):
    done = python(f"import sys; sys.modules[{blocked!r}] = None\n{code}", cwd=workdir)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and f"needs {blocked}" in last
    assert last.endswith('pip install "stream_metrics[hf]"')
    assert "Traceback" in done.stderr and done.stderr.count("ImportError") == 1  # one error, not a chain


def test_a_wandb_folder_standing_in_for_a_missing_wandb_package_is_named(workdir):
    # The interpreter sees the installed packages except wandb (no site, so no .pth files: a path of links),
    # and runs in a folder holding the ./wandb/ of earlier offline runs.
    site = sysconfig.get_paths()["purelib"]
    links = workdir / "site"
    links.mkdir()
    for name in os.listdir(site):
        if not name.lower().startswith("wandb"):
            os.symlink(os.path.join(site, name), links / name)
    (workdir / "wandb" / "offline-run-20260101_000000-abc").mkdir(parents=True)
    done = python("import stream_metrics\nstream_metrics.init(backend='wandb')", cwd=workdir, flags=["-S"],
                  path=os.pathsep.join([ROOT, str(links)]))
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("ImportError: "), done.stderr[-2000:]
    # Each wandb folder on the path is named (a clone where the demo ran holds one more, beside the code).
    named = last.split("found ", 1)[1].split(", not Weights & Biases")[0]
    assert named.startswith("the folder") and str(workdir / "wandb") in named, last
    assert "pip install 'stream_metrics[wandb]'" in last


def test_a_map_style_dataset_gets_no_warning_about_the_datasets_version(workdir, recwarn):
    import datasets

    from stream_metrics.epoch import DatasetProbe

    table = datasets.Dataset.from_dict({"text": ["a", "b", "c"]})
    probe = DatasetProbe.of(table)
    assert probe.length == 3
    assert not [w for w in recwarn if "datasets" in str(w.message)]


@pytest.mark.slow
def test_the_package_builds_with_its_page_and_without_license_warnings(workdir):
    # A copy of the sources (what git tracks), built the way `pip install .` builds it.
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    source = workdir / "src"
    for name in files:
        if os.path.isfile(os.path.join(ROOT, name)):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(open(os.path.join(ROOT, name), "rb").read())
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                           "-w", str(workdir / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # What the build leaves beside the sources is never committed.
    left = sorted(p.name + "/" * p.is_dir() for p in source.iterdir() if p.name not in {n.split("/")[0] for n in files})
    assert left and subprocess.run(["git", "check-ignore", *left], cwd=ROOT, capture_output=True, text=True
                                   ).stdout.split() == left, left
    said = done.stdout + done.stderr
    assert "project.license" not in said, said[-3000:]  # setuptools: "as a TOML table is deprecated"
    [wheel] = os.listdir(workdir / "dist")
    with zipfile.ZipFile(workdir / "dist" / wheel) as built:
        names = built.namelist()
        assert "stream_metrics/compare/page.html" in names
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        assert "License-Expression: Apache-2.0" in built.read(metadata).decode()
