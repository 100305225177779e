"""Weights & Biases: charts keyed by the chosen progress axis from the first row.

Every progress key is defined with ``define_metric``; every other key gets the x-axis through
the glob ``"*"`` (an exact definition beats a glob, so the axes keep their own). ``step=`` is
never passed to ``log``: W&B's own step orders rows, so a resumed run keeps every row. The usual
environment applies (``WANDB_PROJECT``, ``WANDB_MODE``, ``WANDB_DIR``, ``WANDB_API_KEY``).

The run is opened, configured and finished in the training process (it is the process's own
``wandb.run``). Its rows are logged by a child process attached to it (process.py,
_wandb_child.py), so W&B's per-row work does not hold the training process's GIL; ``sender="thread"``
logs them from a thread of the training process instead, as does a run the child cannot attach to.
"""
from __future__ import annotations

import logging
import netrc
import os
import re
from typing import Any
from urllib.parse import urlparse

from .. import schema
from .base import Backend, Row, RunInfo

log = logging.getLogger("stream_metrics")

#: The first W&B release whose runs the sender process attaches to. Checked with three runs in a row
#: from one process: 0.22, 0.25 and 0.31 store every row of each; with 0.17 and 0.18 the second run's
#: rows never reach its file, and with 0.19 each later attach times out after 30 s.
ATTACH_SINCE = (0, 22)
SERVICE_SECONDS = 60.0  # the longest the sender process may take to start W&B's service


_STARTED: dict[int, str] = {}  # pid -> the address of the detached W&B service our sender process started for it


def _connected(wandb) -> bool:
    """Whether this process's W&B is connected to a service (True where this W&B does not say)."""
    setup = getattr(getattr(wandb, "sdk", None), "wandb_setup", None)
    if setup is None or not hasattr(setup, "_singleton"):
        return True
    singleton = setup._singleton
    return (singleton is not None and getattr(singleton, "_pid", os.getpid()) == os.getpid()
            and getattr(singleton, "_connection", True) is not None)


def _version(wandb) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", getattr(wandb, "__version__", ""))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


class WandbCredentialsError(RuntimeError):
    pass


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return host is not None and netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbBackend(Backend):
    name = "wandb"
    max_rows_per_call = 100

    def __init__(self, project: str | None = None, mode: str | None = None, entity: str | None = None,
                 dir: str | None = None, sender: str = "process"):
        if sender not in ("process", "thread"):
            raise ValueError(f"wandb={{'sender': {sender!r}}}: use 'process' (the rows are logged by a child "
                             "process attached to the run, off the training process's GIL; the default) or 'thread'")
        self.sender = sender
        from . import import_wandb

        wandb = import_wandb()
        self._wandb = wandb
        self.project, self.entity, self.dir = project, entity, dir
        self.mode = mode or os.environ.get("WANDB_MODE") or "online"
        if self.mode in ("dryrun",):
            self.mode = "offline"
        self.run: Any = None  # the wandb Run, once open
        self.run_id: str | None = None
        self._owns_run = True
        self._meta: dict = {}
        if wandb.run is None:
            self._check_credentials()  # here, in the caller's thread: fail before training starts

    def _check_credentials(self) -> None:
        if self.mode == "online" and not _has_credentials():
            raise WandbCredentialsError(
                "W&B is in online mode but has no API key, and stream_metrics never prompts: set "
                "WANDB_API_KEY (or run `wandb login`), or set WANDB_MODE=offline to log locally and "
                "`wandb sync` later")

    def start(self, info: RunInfo) -> str:
        wandb = self._wandb
        active = wandb.run
        if self.run is not None:
            pass  # a retry after a failure below: the run is open already, never a second one
        elif active is not None and (info.run_id is None or active.id == info.run_id):
            self.run, self._owns_run = active, False  # the user's own wandb.init(): log into it
        else:
            self._check_credentials()
            self._service_in_sender()
            self.run = wandb.init(
                project=self.project or os.environ.get("WANDB_PROJECT") or info.project,
                entity=self.entity, name=info.name, id=info.run_id, resume="allow" if info.run_id else None,
                # wandb caches its settings for the process; read the environment at each run's start.
                mode=self.mode, dir=self.dir or os.environ.get("WANDB_DIR"), config=info.config,
                settings=wandb.Settings(console="off", silent=True),
            )
        self.run_id = self.run.id
        if self.sender == "process":
            self._start_sender()  # W&B's import in the child overlaps the rest of the start
        if not self._owns_run and info.config:
            self.run.config.update(info.config, allow_val_change=True)
        for key in info.axes:
            if key == info.x_axis:
                self.run.define_metric(key)
            else:
                self.run.define_metric(key, step_metric=info.x_axis)
        self.run.define_metric("*", step_metric=info.x_axis)
        self.set_tags(info.tags)
        return self.run_id

    def log_rows(self, rows: list[Row]) -> None:
        # One call per row: a failure partway leaves stored_seq at the last row W&B took, and the
        # retry starts after it (W&B would store the first rows twice otherwise).
        sender = self._start_sender() if self.sender == "process" else None
        if sender is not None:
            from .process import SenderError

            unstored = [[row.metrics, row.seq] for row in self.unstored(rows)]
            if not unstored:
                return
            try:
                self.mark_stored(sender.log(self.run._attach_id, unstored))
                return
            except SenderError as exc:
                self.mark_stored(exc.stored)
                if not exc.attach_failed:
                    raise
                log.warning("stream_metrics: W&B's sender process cannot attach to run %s (%s); its rows are "
                            "logged by a thread of the training process instead", self.run_id, exc)
                self.sender = "thread"
        for row in self.unstored(rows):
            self.run.log(row.metrics)
            self.stored_seq = row.seq

    def _service_in_sender(self) -> None:
        """Have W&B's service started by our sender process, detached, where this process has none yet.

        W&B's service ends as soon as the process that started it dies, without writing the last
        block of an offline run's file (up to 32 KiB of rows) or what it had not uploaded. Started
        detached, it outlives this process and the sender process, which finishes a run this process
        left (a SIGKILL); the run stays this process's ``wandb.run``. Where the sender process cannot
        start one (a W&B without detached services), this process starts its own, as W&B does.
        """
        from .process import SERVICE, SenderError, WandbSenderProcess, shared_or_none

        address = os.environ.get(SERVICE)
        if address and address == _STARTED.get(os.getpid()) and not _connected(self._wandb):
            # Ours, and this process has left it (wandb.teardown()): it ends once nobody is connected.
            del os.environ[SERVICE]
            address = None
        if address or self.sender != "process" or self.mode == "disabled" or _version(self._wandb) < ATTACH_SINCE:
            return  # a service this process already uses (its own, or a parent's), or no child to attach
        sender = shared_or_none(WandbSenderProcess)
        if not isinstance(sender, WandbSenderProcess):
            return
        try:
            address = sender.service(SERVICE_SECONDS)
        except SenderError as exc:
            log.info("stream_metrics: W&B's service is started by the training process (%s)", exc)
            return
        if not os.environ.get(SERVICE):
            os.environ[SERVICE] = _STARTED[os.getpid()] = address

    def _start_sender(self):
        from .process import WandbSenderProcess, shared_or_none

        # A disabled run, or a W&B without a service, has nothing to attach to; and before W&B 0.22 one
        # child cannot attach to a second run of the process (ATTACH_SINCE). A thread logs their rows.
        attachable = getattr(self.run, "_attach_id", None) and _version(self._wandb) >= ATTACH_SINCE
        sender = shared_or_none(WandbSenderProcess) if attachable else None
        if sender is None:
            self.sender = "thread"
        return sender

    def set_tags(self, tags: dict) -> None:
        self._meta.update(tags)
        self.run.config.update({schema.CONFIG_KEY: dict(self._meta)}, allow_val_change=True)

    def log_summary(self, metrics: dict, row: Row) -> None:
        # The final position goes into the history too, so the last row shows where the run ended.
        self.log_rows([row])
        self.run.summary.update(metrics)

    def finish(self, status: str) -> None:
        if self._owns_run:
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)
        from .process import WandbSenderProcess

        sender = WandbSenderProcess._shared
        attach_id = getattr(self.run, "_attach_id", None)
        if self.sender == "process" and isinstance(sender, WandbSenderProcess) and sender.alive() and attach_id:
            sender.forget(attach_id)  # finished (or the user's to finish): not the child's to finish if we die

    def where(self) -> str:
        folder = getattr(self.run, "dir", None)
        if self.mode == "offline" and folder:
            run_folder = os.path.dirname(folder.rstrip("/"))
            return f"W&B offline run {self.run.id} in {run_folder}: upload with `wandb sync {run_folder}`"
        url = getattr(self.run, "url", None)
        return f"W&B run {self.run.id}" + (f" at {url}" if url else "")

    def target(self) -> dict:
        # The entity too: a run that never opened is created under it by the replay, not the default one.
        target = {"project": self.project or getattr(self.run, "project", None)}
        entity = self.entity or getattr(self.run, "entity", None)
        if entity:
            target["entity"] = entity
        return target

    @classmethod
    def for_replay(cls, target: dict, options: dict) -> "WandbBackend":
        # A replay has no training to keep the GIL for.
        return cls(project=options.get("project") or target.get("project"), entity=target.get("entity"),
                   sender="thread")

    def release(self, finished: bool) -> None:
        if not finished:
            self.finish("FINISHED")  # close the resumed W&B run again
