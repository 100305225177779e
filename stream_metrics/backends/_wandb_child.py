"""The W&B sender process's program (process.py starts it): rows in on stdin, answers out on stdout.

The run stays the training process's own ``wandb.run`` (opened, configured and finished there);
this process attaches to it through W&B's service (``wandb._attach``, the way a run handed to a
``multiprocessing`` child is attached) and only calls ``run.log``. It imports nothing of
stream_metrics (whose package imports torch): only W&B, from the training process's ``sys.path``,
sent in the first line. Protocol, one JSON text per line:

- in, first: ``{"sys_path": [...]}``;
- in, then: ``{"id": n, "attach_id": ..., "rows": [[metrics, seq], ...]}``, with ``"environment"``
  (the training process's ``WANDB_*`` variables, its service's address among them) where they changed;
- in: ``{"id": n, "service": true}``, before the training process's first run: this process starts
  a detached W&B service, and answers ``{"id": n, "service": address}`` (``WANDB_SERVICE``), or an error;
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
run ends with exit code 1. The service must outlive the training process for that: this process
starts it, detached, before the training process's first run (``start_service``).
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
IDLE_TIMEOUT = "10s"  # a detached service ends once no process has been connected to it for this long


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    # The pipes on private descriptors (not inherited), and 0 and 1 elsewhere: W&B's service, which
    # this process may start, inherits 0, 1 and 2, and must neither write into the answers nor hold
    # the answers' pipe open after this process has ended (the training process reads its end).
    requests = os.fdopen(os.dup(0), "r")
    answers = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull)
    sys.stdout = sys.stderr  # anything W&B prints goes to stderr, never into the answers
    hello = json.loads(requests.readline() or "{}")
    if hello.get("sys_path"):
        sys.path[:] = hello["sys_path"]
    runs: dict = {}  # attach id -> the attached run
    parent = os.getppid()
    for line in requests:
        request = json.loads(line)
        if "forget" in request:  # the training process finished that run itself
            runs.pop(request["forget"], None)
            continue
        if request.get("bye"):  # the training process lives on, and its runs are its own to finish
            runs.clear()
            continue
        if request.get("service"):
            runs.clear()  # runs in a service the training process left (a new service replaces it)
            answer(answers, request["id"], **start_service())
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
        answer(answers, request["id"], stored=stored, error=error, attach_failed=attach_failed)
    if runs and parent_died(parent):
        finish_orphans(list(runs.values()))


def answer(answers, request_id: int, **fields) -> None:
    fields.setdefault("stored", None)
    fields.setdefault("error", None)
    try:
        answers.write(json.dumps({"id": request_id, **fields}) + "\n")
        answers.flush()
    except (BrokenPipeError, ValueError):  # the training process is gone
        pass


def start_service() -> dict:
    """Start W&B's service for the training process's runs, detached: ``{"service": its address}``.

    W&B's service ends when the process that started it dies, without writing the last block of
    an offline run's file (up to 32 KiB of rows) or what it had not uploaded yet, however fast this
    process then finishes the run. A detached service (W&B's ``wandb beta core start``) outlives the
    training process and this one, so this process can finish the runs the training process left;
    it ends once no process has been connected to it for IDLE_TIMEOUT. A W&B without detached
    services answers an error, and the training process starts its own, as W&B does.
    """
    try:
        import wandb
        from wandb.sdk.lib.service import service_process  # type: ignore[import-not-found]

        start = getattr(service_process, "start_detached", None)
        if start is None:
            return {"error": f"W&B {getattr(wandb, '__version__', '?')} has no detached service"}
        if getattr(sys.modules.get("wandb.sdk.wandb_setup"), "_singleton", None) is not None:
            wandb.teardown()  # connected to an earlier service: attach through the new one from now on
        process = start(wandb.Settings(), idle_timeout=IDLE_TIMEOUT)
        return {"service": process.token.env_value}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


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
