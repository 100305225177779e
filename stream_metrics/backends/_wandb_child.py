"""The W&B sender process's program (process.py starts it): rows in on stdin, answers out on stdout.

The run stays the training process's own ``wandb.run`` (opened, configured and finished there);
this process attaches to it through W&B's service (``wandb._attach``, the way a run handed to a
``multiprocessing`` child is attached) and only calls ``run.log``. It imports nothing of
stream_metrics (whose package imports torch): only W&B, from the training process's ``sys.path``,
sent in the first line. Protocol, one JSON text per line:

- in, first: ``{"sys_path": [...]}``;
- in, then: ``{"id": n, "attach_id": ..., "rows": [[metrics, seq], ...]}``, with ``"environment"``
  (the training process's ``WANDB_*`` variables, its service's address among them) where they changed;
- in: ``{"forget": attach_id}``, once the training process has finished that run (no answer);
- in: ``{"bye": true}``, last, where the training process lets this process go while it lives on;
- out: ``{"id": n, "stored": seq or null, "error": text or null, "attach_failed": bool}``.

A row counts as stored once W&B's service has taken it: after the rows of a request, one round
trip to the service (a summary request, answered after the records sent before it on this
connection) makes sure of it, so the training process's ``run.finish()`` (on its own connection)
never overtakes them. ``attach_failed`` says the run could not be attached at all (an old W&B, a
run without a service); the training process then logs in a thread of its own. The process ends
when its stdin closes, once every request it has read is answered; it ignores SIGINT and SIGTERM
(the training process's handler delivers its rows through it first). A run it attached to and was
never told to forget belongs to a training process that died without finishing it (SIGKILL, an
out-of-memory kill, a signal handler of the program's own that ended the process at once: stdin
closed with no "bye", and this process's parent gone): this process finishes it, so W&B's service
writes what it holds (offline, the last block of the run's file would be lost otherwise) and the
run ends with exit code 1.
"""
import json
import os
import signal
import sys

SETTLE_SECONDS = 60.0  # the longest a round trip to W&B's service may take before it counts as failed
ORPHAN_SECONDS = 30.0  # the longest the runs of a training process that died may take to finish
PARENT_SECONDS = 5.0  # how long after its stdin closed the parent's death shows (it is reparented)
KEEP_RUNS = 16  # attached runs kept at once
ENVIRONMENT = ("WANDB_",)  # the variables W&B's client reads (process.py sends them)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    answers = sys.stdout
    sys.stdout = sys.stderr  # anything W&B prints goes to stderr, never into the answers
    hello = json.loads(sys.stdin.readline() or "{}")
    if hello.get("sys_path"):
        sys.path[:] = hello["sys_path"]
    runs: dict = {}  # attach id -> the attached run
    parent = os.getppid()
    for line in sys.stdin:
        request = json.loads(line)
        if "forget" in request:  # the training process finished that run itself
            runs.pop(request["forget"], None)
            continue
        if request.get("bye"):  # the training process lives on, and its runs are its own to finish
            runs.clear()
            continue
        if "environment" in request:
            for name in [n for n in os.environ if n.startswith(ENVIRONMENT) and n not in request["environment"]]:
                del os.environ[name]
            os.environ.update(request["environment"])
        stored = None
        error = None
        attach_failed = False
        try:
            run = runs.get(request["attach_id"])
            if run is None:
                if len(runs) >= KEEP_RUNS:  # runs of a sweep, finished long ago: attach again if one comes back
                    del runs[next(iter(runs))]
                try:
                    run = runs[request["attach_id"]] = attach(request["attach_id"])
                except Exception:
                    attach_failed = True
                    raise
            for metrics, seq in request["rows"]:
                run.log(metrics)
                stored = seq
            settle(run)
        except Exception as exc:
            # `stored` stays the last row handed to W&B, also when the round trip after it failed: W&B
            # keeps one row per log call, so a retry of a row it took would store that row twice.
            error = f"{type(exc).__name__}: {exc}"[:500]
        line = json.dumps({"id": request["id"], "stored": stored, "error": error, "attach_failed": attach_failed})
        try:
            answers.write(line + "\n")
            answers.flush()
        except (BrokenPipeError, ValueError):  # the training process is gone
            pass
    if runs and parent_died(parent):
        finish_orphans(list(runs.values()))


def parent_died(parent: int) -> bool:
    """Whether the training process died: its pipe closes as it exits, a moment before this process
    is handed to another parent."""
    import time

    deadline = time.monotonic() + PARENT_SECONDS
    while os.getppid() == parent:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def finish_orphans(runs: list) -> None:
    """Finish the runs the training process never finished (it died), within ORPHAN_SECONDS in all."""
    import threading

    def finish(run) -> None:
        try:
            run.finish(exit_code=1)
        except Exception as exc:  # a service that is gone: nothing more can be written
            print(f"stream_metrics W&B sender: could not finish run {getattr(run, 'id', '?')}: {exc}",
                  file=sys.stderr, flush=True)

    threads = [threading.Thread(target=finish, args=(run,), daemon=True) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(ORPHAN_SECONDS)


def attach(attach_id: str):
    import wandb

    run = wandb._attach(attach_id=attach_id)  # type: ignore[attr-defined]  # not in its stubs
    if run is None:
        raise RuntimeError(f"W&B could not attach to run {attach_id}")
    return run


def settle(run) -> None:
    """Return once W&B's service has taken every row this process sent for ``run``."""
    interface = getattr(run, "_interface", None) or getattr(getattr(run, "_backend", None), "interface", None)
    deliver = getattr(interface, "deliver_get_summary", None)
    if deliver is None:
        run.summary.keys()  # the public way to the same round trip (its timeout is W&B's own)
        return
    handle = deliver()
    if hasattr(handle, "wait_or"):
        handle.wait_or(timeout=SETTLE_SECONDS)  # raises TimeoutError
    elif handle.wait(timeout=SETTLE_SECONDS) is None:
        raise TimeoutError(f"W&B's service did not answer within {SETTLE_SECONDS:.0f} s")


if __name__ == "__main__":
    main()
