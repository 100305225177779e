"""MLflow's and W&B's rows written by child processes, so the training process's GIL stays with training.

Why: MLflow's client spends about 0.8 ms of CPU per row (SQLAlchemy for a SQLite store, HTTP and
JSON for a server), W&B's ``run.log`` about 0.5 ms in a training loop, mostly in Python. In a thread
of the training process that work holds the GIL the training thread needs, and a training step
waits for it (benchmarks/README.md, "Where the time goes"). In a child process it runs on another core.

What stays in the training process: opening the run, its tags and parameters, and its end go
through the training process's own client as before, so the run is the process's active run and
a user's own ``mlflow.log_*`` or ``wandb.log`` calls land in it. Only the rows go to the child, as
JSON lines on a pipe; the sender thread waits for the answer in a system call, without the GIL.
MLflow's child opens its own client on the run's store (_mlflow_child.py); W&B's attaches to the
training process's run through W&B's service (_wandb_child.py).

One child of each kind serves every run of the training process (it starts on first use, in the
background, while training goes on; the import of MLflow or W&B costs a second or two of CPU,
once). It is a fresh interpreter (``python -c``), not ``multiprocessing``, whose spawn would re-run
an unguarded training script; it imports its library from the training process's ``sys.path`` and
nothing of stream_metrics. Settings (which may hold credentials) go on its stdin, never on its
command line. A failure in the child comes back as an exception from ``log_rows``, with the rows
stored before it, so delivery's retries, buffer and spill file work as they do in a thread; a
child that died is started again at the next call. The child ends when the training process does.
"""
from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import subprocess
import sys
import threading

log = logging.getLogger("stream_metrics")

_HERE = os.path.dirname(os.path.abspath(__file__))
_LAUNCH = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


class SenderError(RuntimeError):
    """A call the child could not complete; ``stored`` is the seq of the last row it stored, or None."""

    def __init__(self, message: str, stored: int | None = None, attach_failed: bool = False):
        super().__init__(message)
        self.stored = stored
        self.attach_failed = attach_failed  # W&B's child could not attach to the run at all


class SenderProcess:
    """MLflow's child process and the thread that reads its answers; ``call`` is safe from any thread."""

    label = "MLflow"
    program = os.path.join(_HERE, "_mlflow_child.py")
    environment_prefixes: tuple[str, ...] = ("MLFLOW_", "DATABRICKS_")  # the variables its client reads
    _shared: "SenderProcess | None" = None
    idle_seconds: float | None = None  # a URI's thread in the child leaves after this (None: the child's default)
    says_bye = False  # close() tells the child it lets go while this process lives on
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> "SenderProcess":
        """This process's sender, started now if there is none (or it died)."""
        with cls._shared_lock:
            sender = cls._shared
            if sender is None or not sender.alive():
                sender = cls._shared = cls()
            return sender

    def __init__(self) -> None:
        self.owner = os.getpid()
        # Its own session: a Ctrl-C or a signal to the terminal's process group is for the training
        # process, whose handler still delivers rows through this child before the process ends.
        self.child = subprocess.Popen([sys.executable, "-c", _LAUNCH, self.program], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
        assert self.child.stdin is not None and self.child.stdout is not None
        self._stdin, self._stdout = self.child.stdin, self.child.stdout
        self._write_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, list] = {}  # id -> [threading.Event, answer]
        self._waiting_lock = threading.Lock()
        self._stopped: str | None = None
        self._environment = self._settings()  # the child's, as it started
        self._write({"sys_path": sys.path, "idle_seconds": self.idle_seconds})
        self._reader = threading.Thread(target=self._read, name=f"stream_metrics-{self.label.lower()}-answers",
                                        daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.child.pid

    def alive(self) -> bool:
        return self.owner == os.getpid() and self._stopped is None and self.child.poll() is None

    def call(self, uri: str, run_id: str, rows: list, per_call: int) -> int | None:
        """Store ``rows`` ([metrics, timestamp_ms, step, seq] each) in ``run_id``; the last seq stored.

        Waits for the answer however long the child takes (as a call to MLflow in a thread would);
        delivery warns about a call that stalls, and gives up on it when the run must end.
        """
        return self._call({"uri": uri, "run_id": run_id, "per_call": per_call, "rows": rows})["stored"]

    def _settings(self) -> dict:
        return {k: v for k, v in os.environ.items() if k.startswith(self.environment_prefixes)}

    def _call(self, request: dict, timeout: float | None = None) -> dict:
        """Send ``request`` and wait for its answer (up to ``timeout`` seconds, None: however long);
        a failure raises SenderError with the rows stored."""
        slot: list = [threading.Event(), None]
        request_id = next(self._ids)
        with self._waiting_lock:
            if self._stopped is not None:
                raise SenderError(self._stopped)
            self._waiting[request_id] = slot
        request = {"id": request_id, **request}
        # The client reads its settings (retries, timeouts, tokens) from the environment at each call:
        # the child follows the training process's, as it is now.
        environment = self._settings()
        if environment != self._environment:
            request["environment"] = self._environment = environment
        try:
            self._write(request)
        except (OSError, ValueError) as exc:  # a closed pipe: the child is gone
            self._stop(f"the {self.label} sender process stopped ({exc})")
        if not slot[0].wait(timeout):
            with self._waiting_lock:
                self._waiting.pop(request_id, None)
            raise SenderError(f"the {self.label} sender process did not answer within {timeout:.0f} s")
        answer = slot[1]
        if answer.get("error") is not None:
            raise SenderError(f"{self.label} (sender process): {answer['error']}", answer.get("stored"),
                              attach_failed=bool(answer.get("attach_failed")))
        return answer

    def _write(self, message: dict) -> None:
        line = json.dumps(message) + "\n"
        with self._write_lock:
            self._stdin.write(line)
            self._stdin.flush()

    def _read(self) -> None:
        try:
            for line in self._stdout:
                answer = json.loads(line)
                with self._waiting_lock:
                    slot = self._waiting.pop(answer.get("id"), None)
                if slot is not None:
                    slot[1] = answer
                    slot[0].set()
        except (OSError, ValueError):
            pass
        self._stop(f"the {self.label} sender process stopped" + (f" (exit status {self.child.poll()})"
                                                           if self.child.poll() is not None else ""))

    def _stop(self, why: str) -> None:
        with self._waiting_lock:
            if self._stopped is None:
                self._stopped = why
            waiting, self._waiting = self._waiting, {}
        for slot in waiting.values():
            slot[1] = {"error": why, "stored": None}
            slot[0].set()

    def close(self, timeout: float = 5.0) -> None:
        """Let the child end: at once where a call is still unanswered (the run's end gave up on it and
        saved its rows), else once it has exited, killed after ``timeout`` seconds."""
        with self._waiting_lock:
            abandoned = bool(self._waiting)
        try:
            if self.says_bye:  # alive: the runs it attached to are ours to finish (_wandb_child.py)
                self._write({"bye": True})
            self._stdin.close()
            if abandoned:
                self.child.kill()
            self.child.wait(timeout=timeout)
        except Exception:
            self.child.kill()


class WandbSenderProcess(SenderProcess):
    """W&B's child process: it attaches to the training process's run and logs its rows (_wandb_child.py)."""

    label = "W&B"
    program = os.path.join(_HERE, "_wandb_child.py")
    environment_prefixes = ("WANDB_",)  # W&B's settings, and the address of the service its run is in
    says_bye = True
    _shared: "SenderProcess | None" = None
    _shared_lock = threading.Lock()

    def log(self, attach_id: str, rows: list) -> int | None:
        """Log ``rows`` ([metrics, seq] each) into the run ``attach_id``, in order; the last seq W&B took."""
        return self._call({"attach_id": attach_id, "rows": rows})["stored"]

    def service(self, timeout: float) -> str:
        """Start a detached W&B service (_wandb_child.py) and return its address (``WANDB_SERVICE``):
        it outlives this process and the child, so the child can finish a run this process left.
        Raises SenderError where the child cannot start one (a W&B without detached services)."""
        address = self._call({"service": True}, timeout).get("service")
        if not isinstance(address, str) or not address:
            raise SenderError("the W&B sender process gave no service address")
        return address

    def forget(self, attach_id: str) -> None:
        """The run ``attach_id`` was finished here: the child lets go of it. One it was not told of, it
        finishes itself when this process dies (_wandb_child.py)."""
        try:
            self._write({"forget": attach_id})
        except (OSError, ValueError):  # the child is gone: nothing to tell
            pass


_KINDS = (SenderProcess, WandbSenderProcess)
SERVICE = "WANDB_SERVICE"  # where W&B's client finds its process's service (wandb.env.SERVICE)


def shared_or_none(kind: type[SenderProcess]) -> SenderProcess | None:
    """This process's sender of ``kind``, or None, with a warning, where no child process can be started
    (a sandbox, an odd interpreter): the backend then writes its rows from a thread."""
    try:
        return kind.shared()
    except OSError as exc:
        log.warning("stream_metrics: cannot start %s's sender process (%s); its rows are written by a thread of "
                    "the training process instead", kind.label, exc)
        return None


@atexit.register
def _close_at_exit() -> None:
    # atexit runs after lifecycle.py's exit hook (threading's), which finished the open runs.
    for kind in _KINDS:
        sender = kind._shared
        if sender is not None and sender.owner == os.getpid():
            sender.close()


def _forget_in_child() -> None:
    # A forked DataLoader worker must never write into its parent's pipe.
    for kind in _KINDS:
        kind._shared = None
        kind._shared_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
