"""However the process ends, open runs are finished: every row stored or spilled, no run left RUNNING.

- **Interpreter exit** (a run never finished, even one made in a function and dropped): open runs
  are held here strongly and finished by an exit hook that runs before ``atexit`` hooks
  (``threading._register_atexit``), so our rows reach W&B before W&B's own ``atexit`` hook shuts its
  service down. The run ends FAILED after an uncaught exception (the interpreter keeps it in
  ``sys.last_value``), KILLED after an uncaught ``KeyboardInterrupt``, FINISHED otherwise.
- **SIGTERM** (Slurm preemption, Kubernetes, torchrun tearing a job down), and SIGINT where the
  program has no ``KeyboardInterrupt`` handler in force: rows are delivered within
  ``STREAM_METRICS_SIGNAL_TIMEOUT`` seconds (default 10), the rest is spilled with the replay
  command printed, the runs end KILLED, and the default action ends the process, so the exit
  status still says it died of the signal.
- **A handler of the program's own** (a graceful stop, the Trainer's ``enable_jit_checkpoint``):
  the rows are delivered, MLflow shows KILLED, and the runs stay open while the handler runs
  (``_hand_on``): if it ends the process, every row is stored; if it returns, the program goes on
  logging into the same runs, which end KILLED.
- **SIGINT under Python's default handler** (Ctrl-C, every notebook): rows are flushed, then the
  ``KeyboardInterrupt`` is raised as before; the run stays open, so training can go on in it.
- Handlers are installed only in the main thread, only while a run is open, never where the
  signal is ignored (``nohup``) or handled outside Python; they are put back when the last run ends.
- A forked child (DataLoader workers) forgets the runs it inherited: only their owner finishes them.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("stream_metrics")

SIGNAL_TIMEOUT_ENV = "STREAM_METRICS_SIGNAL_TIMEOUT"
SIGNAL_TIMEOUT = 10.0  # seconds to deliver rows on a signal; a scheduler's grace period is often 30 s
SIGNALS = ("SIGTERM", "SIGINT")

_open: dict[int, "Run"] = {}  # id -> run: strong references, so a dropped run is still finished
_lock = threading.RLock()
# signal number -> the handler ours replaced
_previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
# ids of the open runs a signal reached while the program's own handler took it: they end KILLED
_signalled: set[int] = set()


def opened(run: "Run") -> None:
    """Hold ``run`` until it finishes; install the signal handlers (main thread only)."""
    with _lock:
        _open[id(run)] = run
        _install()


def closed(run: "Run") -> None:
    """``run`` has finished: let go of it; with no run open, put the signal handlers back."""
    with _lock:
        _open.pop(id(run), None)
        _signalled.discard(id(run))
        if not _open:
            _uninstall()


def is_open(run: "Run") -> bool:
    """True until ``run`` has finished closing its backends."""
    return id(run) in _open


def signalled(run: "Run") -> bool:
    """True where a signal reached ``run`` and the program's own handler let the program go on."""
    return id(run) in _signalled


def open_runs() -> list["Run"]:
    with _lock:
        return list(_open.values())


def exit_status() -> str:
    """How the program ended, as a run status: an uncaught exception leaves it in ``sys.last_value``."""
    exc = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


def signal_timeout() -> float:
    text = os.environ.get(SIGNAL_TIMEOUT_ENV)
    if text is None:
        return SIGNAL_TIMEOUT
    try:
        seconds = float(text)
        if seconds >= 0:
            return seconds
    except ValueError:
        pass
    log.warning("stream_metrics: %s=%r is not a number of seconds >= 0; using %g", SIGNAL_TIMEOUT_ENV, text,
                SIGNAL_TIMEOUT)
    return SIGNAL_TIMEOUT


def finish_all(status: str, timeout: float | None = None) -> None:
    """Finish every open run with ``status``, all within ``timeout`` seconds (default: each run's own)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for run in open_runs():
        for attempt in range(2):  # a second finish() closes what the first left (it delivers or spills the rest)
            try:
                run.finish(status, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
                break
            except Exception as exc:  # one run's failure must not keep the others open
                if attempt:
                    log.exception("stream_metrics: could not finish a run at exit")
                else:  # e.g. torch's SIGCHLD handler raising in the wait: DataLoader workers died of the signal
                    log.warning("stream_metrics: finishing a run was interrupted (%s: %s); finishing it once more",
                                type(exc).__name__, exc)


# ---------------------------------------------------------------------- interpreter exit
def _at_exit() -> None:
    if not open_runs():
        return
    others = [t for t in threading.enumerate()
              if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if others:
        # Training may go on in a thread the interpreter is about to wait for: finish after it, first
        # among the atexit hooks (the last registered runs first), so still before W&B's teardown.
        atexit.register(_finish_at_exit)
        return
    _finish_at_exit()


def _finish_at_exit() -> None:
    finish_all(exit_status())  # runs a signal reached end KILLED (Run.finish)


# threading's exit hooks run when the main thread ends, before atexit hooks (W&B tears its service
# down in one of those) and while our daemon sender threads still run.
try:
    threading._register_atexit(_at_exit)  # type: ignore[attr-defined]  # CPython 3.9+
except (AttributeError, RuntimeError):  # another Python, or imported while the interpreter shuts down
    atexit.register(_finish_at_exit)


# ---------------------------------------------------------------------- signals
def _install() -> None:
    if _previous or threading.current_thread() is not threading.main_thread():
        return
    for name in SIGNALS:
        number = getattr(signal, name, None)
        if number is None:
            continue
        try:
            current = signal.getsignal(number)
            # Ignored (nohup) stays ignored; a handler set outside Python could not be handed on.
            if current is signal.SIG_IGN or current is None or current is _on_signal:
                continue
            signal.signal(number, _on_signal)
        except (ValueError, OSError):  # not the main interpreter
            continue
        _previous[number] = current


def _uninstall() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for number, previous in list(_previous.items()):
        try:
            if signal.getsignal(number) is _on_signal:  # a handler set after ours stays
                signal.signal(number, previous)
        except (ValueError, OSError):
            pass
        del _previous[number]


def _on_signal(number: int, frame) -> None:
    previous = _previous.get(number, signal.SIG_DFL)
    name = signal.Signals(number).name
    timeout = signal_timeout()
    if number == signal.SIGINT and previous is signal.default_int_handler:
        # It becomes a KeyboardInterrupt the program may catch (a notebook always does): flush, and
        # leave the run open, so training can go on in it. An uncaught one closes it at exit.
        deadline = time.monotonic() + timeout
        for run in open_runs():
            run.flush(max(0.0, deadline - time.monotonic()))
        previous(number, frame)
        return
    # DataLoader workers die of the same signal (a job's whole process group gets it), and torch's
    # SIGCHLD handler would raise in the middle of the delivery: SIGCHLD waits until the signal is
    # handed on (a default action ends the process first).
    blocked = _block_sigchld()
    try:
        if callable(previous):
            _hand_on(number, frame, previous, name, timeout)
            return
        if open_runs():
            log.warning("stream_metrics: %s received: delivering rows for up to %g s (%s), then the runs end "
                        "KILLED", name, timeout, SIGNAL_TIMEOUT_ENV)
            finish_all("KILLED", timeout)
        # Hand the signal on, so the process ends as it would have without us.
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    finally:
        if blocked is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _hand_on(number: int, frame, previous: Callable, name: str, timeout: float) -> None:
    """The program's own handler takes the signal: it may end the process at once (sending the signal
    again, ``os._exit``), raise, or let training go on to a checkpoint of its own (the Trainer's
    ``enable_jit_checkpoint``). So the rows go out first and the runs show KILLED where a backend
    shows a status while open (MLflow); the runs stay open, so what the program logs on its way out
    (a last row, the state its checkpoint keeps) still counts. If the handler returns, the runs show
    RUNNING again, and end KILLED whenever they end: the signal cut the run short."""
    runs = open_runs()
    if runs:
        log.warning("stream_metrics: %s received: delivering rows for up to %g s (%s), then the program's own "
                    "handler runs; the runs stay open while the program goes on, and end KILLED", name, timeout,
                    SIGNAL_TIMEOUT_ENV)
        deadline = time.monotonic() + timeout
        for run in runs:
            _signalled.add(id(run))
            try:  # queued after the rows, and waited for with them
                run.show_status("KILLED", max(0.0, deadline - time.monotonic()))
            except Exception:  # one run's failure must not keep the handler from running
                log.exception("stream_metrics: could not deliver a run's rows on %s", name)
    try:
        previous(number, frame)
    except KeyboardInterrupt:
        # As under Python's own Ctrl-C handler: the program may catch it and go on in the same runs
        # (an uncaught one ends them KILLED at exit all the same).
        _go_on(runs, name, signalled=False)
        raise
    _go_on(runs, name, signalled=True)


def _go_on(runs: list["Run"], name: str, signalled: bool) -> None:
    """The program goes on after its handler: the runs still open show RUNNING again (queued, not
    waited for); ``signalled``: they end KILLED (Run.finish)."""
    for run in runs:
        if not signalled:
            _signalled.discard(id(run))
        if is_open(run):
            try:
                run.show_status("RUNNING")
            except Exception:
                log.exception("stream_metrics: could not show a run as running again after %s", name)


def _block_sigchld():
    """Block SIGCHLD in this thread; the mask before, or None where signals cannot be masked."""
    if not hasattr(signal, "pthread_sigmask") or not hasattr(signal, "SIGCHLD"):
        return None
    try:
        return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    except (OSError, ValueError):
        return None


def _forget_in_child() -> None:
    # A forked child (a DataLoader worker) must not finish or write to its parent's runs.
    global _lock
    _open.clear()
    _lock = threading.RLock()  # the parent may have held it while forking


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
