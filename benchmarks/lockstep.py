"""Lock-step interleaving: the runs compared take turns every few steps, so the machine's slow stretches fall on both.

On a shared virtual machine the speed of one core drifts by 10-30% over seconds (benchmarks/README.md):
two whole runs a few seconds apart differ by more than the 2% the targets ask about. Here each
variant trains in its own process at the same time as the others, but only one of them runs at a
time: the coordinator hands a turn of ``window`` steps to one process, waits for it to report the
turn's wall time and CPU time, then hands the next turn to the next process (base, k1, base, k2,
base, ...). A process that is not on its turn waits in a blocking read of its stdin, between two
steps; its own background work (our sender threads, the child processes, W&B's service) goes on
meanwhile, as it would in a real run. A variant's ratio for one cycle is its turn over the mean of
the two base turns beside it (a fraction of a second each way); the figures are medians over cycles.

Each process is the training a user runs: the same Trainer (or loop), its own runs, its own store
(an SQLite file and a W&B folder each), started and ended as in section 3 (or 3b). What it cannot
see: a variant's background work that falls in another variant's turn costs that variant nothing,
where in a real run it would share the machine with the variant's own training. For our variants
that work is the rows' delivery: one call per backend a second, a few ms of CPU each (section 3's
CPU ratios), so this bias is a fraction of a percent in our favour; the whole-run ratios of
sections 3 and 3b, which have no such bias, stay beside these.

    python benchmarks/lockstep.py --worker trainer:b --window 20 ...   # one process (the coordinator starts it)
"""
from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
#: A worker that says nothing for this long has hung: the benchmark stops instead of waiting forever.
ANSWER_SECONDS = 600
_OUT = sys.stdout  # a worker's messages to the coordinator (main() moves everything else to stderr)


class Worker:
    """One variant's process, on a turn only when told."""

    def __init__(self, mode: str, kind: str, folder: str, args: list[str]):
        os.makedirs(folder, exist_ok=True)
        env = dict(os.environ, WANDB_DIR=folder, MLFLOW_TRACKING_URI=f"sqlite:///{folder}/mlflow.db",
                   STREAM_METRICS_SPILL_DIR=os.path.join(folder, "undelivered"))
        self.kind = kind
        self.log = os.path.join(folder, "worker.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "lockstep.py"), "--worker",
                                          f"{mode}:{kind}", "--folder", folder, *args], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1, cwd=folder, env=env)

    def expect(self, word: str) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], ANSWER_SECONDS)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            raise RuntimeError(f"lock-step worker {self.kind} ended or hung (exit status {self.proc.wait()}); "
                               f"its output: {self.log}")
        message = json.loads(line)
        if message["say"] != word:
            raise RuntimeError(f"lock-step worker {self.kind} said {message} where {word!r} was expected")
        return message

    def tell(self, message: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def turn(self) -> tuple[float, float]:
        self.tell({"do": "turn"})
        got = self.expect("turn")
        return got["wall"], got["cpu"]

    def stop(self, timeout: float = 180) -> dict:
        self.tell({"do": "stop"})
        got = self.expect("stopped")
        self.proc.wait(timeout=timeout)
        return got


def interleave(mode: str, base: str, kinds: list[str], cycles: int, warmup_cycles: int, window: int, workdir: str,
               args: list[str], say=print) -> dict:
    """Start one process per variant, then run ``cycles`` cycles of turns (base, k1, base, k2, ..., base),
    the kinds' order rotated each cycle. Returns per-kind lists of per-cycle ratios to the base (wall
    and CPU), the turns' times, and what each process reported at its end."""
    workers = {k: Worker(mode, k, os.path.join(workdir, f"lockstep-{mode}-{k}"), ["--window", str(window), *args])
               for k in (base, *kinds)}
    try:
        for w in workers.values():
            w.expect("ready")
        ratios: dict = {k: [] for k in kinds}
        cpu_ratios: dict = {k: [] for k in kinds}
        turns: dict = {k: [] for k in (base, *kinds)}
        for cycle in range(warmup_cycles + cycles):
            order = kinds[cycle % len(kinds):] + kinds[:cycle % len(kinds)]
            before = workers[base].turn()
            for kind in order:
                wall, cpu = workers[kind].turn()
                after = workers[base].turn()
                if cycle >= warmup_cycles:
                    ratios[kind].append(wall / ((before[0] + after[0]) / 2))
                    cpu_ratios[kind].append(cpu / ((before[1] + after[1]) / 2))
                    turns[kind].append(wall)
                    turns[base].append(before[0])
                before = after
            if cycle >= warmup_cycles and (cycle - warmup_cycles) % 10 == 9:
                say(f"    lock-step {mode}, cycle {cycle - warmup_cycles + 1}/{cycles}: "
                    + ", ".join(f"{k}/{base} {sorted(v)[len(v) // 2]:.3f}" for k, v in ratios.items()))
        ends = {k: w.stop() for k, w in workers.items()}
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
    return {"ratios": ratios, "cpu_ratios": cpu_ratios, "turns": turns, "ends": ends}


def measure(mode: str, base: str, kinds: list[str], rounds: int, cycles: int, window: int, workdir: str,
            args: list[str], pairs=(), warmup_cycles: int = 2, say=print) -> dict:
    """``rounds`` lock-step interleavings, each with fresh processes (a process's own speed differs from
    another's running the same code by a few percent: where its memory landed, which core it began on).

    Returns, per kind (and per pair ``(k1, k2)``: k1's ratio over k2's in the same cycle): each round's
    median ratio to the base, wall and CPU; the median of those (the figure); the spread of the round
    medians; and the median turn in ms per step.
    """
    rounds_wall: dict = {k: [] for k in (*kinds, *(f"{x}/{y}" for x, y in pairs))}
    rounds_cpu: dict = {k: [] for k in kinds}
    turns: dict = {k: [] for k in (base, *kinds)}
    ends = []
    for i in range(rounds):
        got = interleave(mode, base, kinds, cycles, warmup_cycles, window, os.path.join(workdir, f"round-{i}"),
                         args, say)
        for k in kinds:
            rounds_wall[k].append(_median(got["ratios"][k]))
            rounds_cpu[k].append(_median(got["cpu_ratios"][k]))
        for x, y in pairs:
            rounds_wall[f"{x}/{y}"].append(_median([a / b for a, b in zip(got["ratios"][x], got["ratios"][y])]))
        for k, v in got["turns"].items():
            turns[k].extend(t / window * 1e3 for t in v)
        ends.append(got["ends"])
        say(f"    lock-step {mode}, round {i + 1}/{rounds}: "
            + ", ".join(f"{k} {v[-1]:.3f}" for k, v in rounds_wall.items()))
    return {"ratio": {k: _median(v) for k, v in rounds_wall.items()}, "rounds": rounds_wall,
            "spread": {k: (min(v), max(v)) for k, v in rounds_wall.items()},
            "cpu_ratio": {k: _median(v) for k, v in rounds_cpu.items()},
            "per_step": {k: _median(v) for k, v in turns.items()}, "ends": ends,
            "settings": {"rounds": rounds, "cycles": cycles, "window": window, "warmup_cycles": warmup_cycles}}


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2


# ---------------------------------------------------------------------------------------------- the workers
def _say(word: str, **fields) -> None:
    _OUT.write(json.dumps({"say": word, **fields}) + "\n")
    _OUT.flush()


def _next_order() -> str:
    line = sys.stdin.readline()
    return json.loads(line)["do"] if line else "stop"


def trainer_worker(kind: str, window: int, warmup: int, folder: str, corpus: str) -> None:
    """Kinds as in section 3: a (no tracking), b (ours, both backends), c (the Trainer's own W&B and
    MLflow, with its token counter), d (ours, backend none), e (as b, rows written by threads)."""
    import gc

    import torch
    from streaming_trainer import build_trainer
    from transformers import TrainerCallback

    from stream_metrics.hf import StreamMetricsCallback

    torch.set_num_threads(int(os.environ.get("STREAM_METRICS_BENCH_THREADS", "1")))
    os.environ["MLFLOW_EXPERIMENT_NAME"] = os.environ["WANDB_PROJECT"] = "bench_lockstep"
    ours = None
    if kind in ("b", "d", "e"):
        ours = StreamMetricsCallback(backend="none" if kind == "d" else ["mlflow", "wandb"], progress=False,
                                     **({"mlflow": {"sender": "thread"}, "wandb": {"sender": "thread"}}
                                        if kind == "e" else {}))

    class Turns(TrainerCallback):
        """Last in the list: a turn ends after every callback of its last step has run."""

        def __init__(self):
            self.start = self.cpu = None
            self.stopping = False

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step < warmup or (step - warmup) % window:
                return
            if self.start is not None:
                _say("turn", wall=time.perf_counter() - self.start, cpu=time.process_time() - self.cpu)
            else:
                if ours is not None and ours.run is not None:
                    ours.run.flush()  # our runs open in the background at the first row: not timed
                _say("ready")
            if _next_order() == "stop":
                self.stopping = control.should_training_stop = True
                return
            self.start, self.cpu = time.perf_counter(), time.process_time()

    extra = {"report_to": ["wandb", "mlflow"], "include_num_input_tokens_seen": "non_padding"} if kind == "c" else {}
    trainer, _ = build_trainer(os.path.join(folder, "out"), max_steps=10 ** 7, batch_size=8, grad_accum=2,
                               data=sorted(os.path.join(corpus, f) for f in os.listdir(corpus)),
                               callbacks=[c for c in (ours, Turns()) if c is not None], logging_steps=5, **extra)
    trainer.train()
    if kind == "c":  # the Trainer's W&B integration leaves its run open
        import wandb

        wandb.finish()
    delivered = sum(d.delivered_rows for d in ours.run.tracking.deliveries) if ours is not None else None
    del trainer
    gc.collect()
    _say("stopped", delivered=delivered)


def plain_worker(kind: str, window: int, folder: str) -> None:
    """Kinds as in section 3b: bare, none, mlflow, wandb, ours (both), thread (both by threads)."""
    import torch
    from run import realistic_batch, tiny_training_step

    import stream_metrics

    torch.set_num_threads(int(os.environ.get("STREAM_METRICS_BENCH_THREADS", "1")))
    batch = {k: v[:, :128] for k, v in realistic_batch().items()}
    _, train_step = tiny_training_step(batch)
    for _ in range(5):
        train_step()
    run = None
    if not kind.startswith("bare"):  # bare, bare2, ...: the same loop in another process
        backend = {"none": "none", "mlflow": "mlflow", "wandb": "wandb"}.get(kind, ["mlflow", "wandb"])
        sender = "thread" if kind == "thread" else "process"
        run = stream_metrics.init(backend=backend, pad_token_id=0, flush_timeout=120,
                                  mlflow={"experiment": "bench_lockstep", "sender": sender},
                                  wandb={"project": "bench_lockstep", "sender": sender})
        for _ in range(5):  # the first row opens the runs in the background: not timed
            run.update(batch)
            run.log({"loss": train_step().detach(), "learning_rate": 3e-4})
        run.flush()
    _say("ready")
    rows = 0
    while _next_order() == "turn":
        t, cpu = time.perf_counter(), time.process_time()
        for _ in range(window):
            loss = train_step()
            if run is not None:
                run.update(batch)
                run.log({"loss": loss.detach(), "learning_rate": 3e-4})
        _say("turn", wall=time.perf_counter() - t, cpu=time.process_time() - cpu)
        rows += window if run is not None else 0
    if run is not None:
        run.finish()
    _say("stopped", rows=rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", required=True, help="mode:kind, e.g. trainer:b or plain:ours")
    parser.add_argument("--folder", required=True)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--corpus", default="")
    args = parser.parse_args(argv)
    # The messages keep the pipe to themselves: whatever the libraries print (the Trainer prints every
    # row) goes to the worker's log, with stderr.
    global _OUT
    _OUT = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "examples"), os.path.dirname(HERE)]
    import run  # noqa: F401  (the environment benchmarks/run.py sets: offline W&B, no stray run ids)

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("mlflow", "alembic", "transformers", "wandb", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    mode, kind = args.worker.split(":")
    if mode == "trainer":
        trainer_worker(kind, args.window, args.warmup, args.folder, args.corpus)
    else:
        plain_worker(kind, args.window, args.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
