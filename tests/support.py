"""Test and benchmark helpers that stand apart from pytest: a real MLflow server, a sync counter, a
backend that stores nothing."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import torch

from stream_metrics.backends.base import Backend


def wait_for(condition, seconds: float = 30.0, interval: float = 0.02) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass (a bounded loop); its last answer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def run_together(commands: list[list[str]], timeout: float, **popen) -> list[subprocess.CompletedProcess]:
    """``subprocess.run(command, capture_output=True, text=True)`` for each command, all started at once
    (independent commands whose time is mostly start-up end in about the time of one); each is
    killed if it has not ended within ``timeout`` seconds of the start. ``popen``: for every command,
    or ``env=[...]`` with one environment per command."""
    envs = popen.pop("env", None)
    envs = envs if isinstance(envs, list) else [envs] * len(commands)
    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout
    try:
        for command, env in zip(commands, envs):
            procs.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, **popen))
        outputs = [proc.communicate(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    return [subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            for proc, (out, err) in zip(procs, outputs)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store, which a test can stop and start again.

    It runs in its own process group, so ``stop()`` ends the server's workers too; every wait is bounded.
    """

    def __init__(self, folder, port: int | None = None):
        self.folder = str(folder)
        os.makedirs(self.folder, exist_ok=True)
        self.port = port or free_port()
        self.store = f"sqlite:///{self.folder}/srv.db"
        self.proc = None

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials + '@' if credentials else ''}127.0.0.1:{self.port}"

    def start(self, timeout: float = 120, wait: bool = True) -> None:
        with open(os.path.join(self.folder, "server.log"), "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store, "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                cwd=self.folder, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url() + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)

    def log_tail(self) -> str:
        with open(os.path.join(self.folder, "server.log"), errors="replace") as f:
            return f.read()[-2000:]


class SyncCounter(torch.Tensor):
    """A tensor that counts every way the host can wait for its values."""

    syncs = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
                    "_local_scalar_dense", "__format__", "__repr__"):
            cls.syncs += 1
        return super().__torch_function__(func, types, args, kwargs or {})



class InMemory(Backend):
    """A test backend for our own delivery: accepts every call and stores nothing; its run is named
    after its class. Subclasses say what ``log_rows`` keeps."""

    name = "mlflow"

    def start(self, info):
        self.run_id = type(self).__name__.lower()
        return self.run_id

    def log_rows(self, rows):
        pass

    def set_tags(self, tags):
        pass

    def log_summary(self, metrics, row):
        pass

    def finish(self, status):
        pass
