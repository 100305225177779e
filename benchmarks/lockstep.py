"""Lock-step interleaving: the runs compared take turns every few steps, so the machine's slow stretches fall on both.

On a shared virtual machine the speed of one core drifts by 10-30% over seconds (benchmarks/README.md):
two whole runs a few seconds apart differ by more than the 2% the targets ask about. Here each
variant trains in its own process, all started together, but only one of them runs at a time: the
coordinator hands a turn of ``window`` steps to one process, waits for it to report the turn's
wall time and CPU time, then hands the next turn to the next process (base, k1, base, k2, base,
...). A variant's ratio for one cycle is its turn over the mean of the two base turns beside it, so
the machine's drift falls on both sides of each ratio; the figures are medians over cycles, then
over rounds of fresh processes.

Between its turns a process is stopped (SIGSTOP), with every process under it: our senders' child
processes, W&B's service, the data loader's workers. Its background work therefore runs only in
its own turns, beside its own training, as in a real run; none of it lands in another variant's
turn, where it would cost its owner nothing (that was this method's bias, in our favour, before
the processes were stopped). Rows wait up to a second to go to a backend in one call, so a turn
lasts about a second (run.py's windows: 80 Trainer steps, 140 loop steps): with much shorter
turns each turn would end in a call of its own, and the calls' fixed cost would count several
times over (a bias against us: MLflow's SQLite store takes about 9 ms of CPU per call and 0.8 ms
per row of 12 metrics).

Each process is the training a user runs: the same Trainer (or loop), its own runs, its own store
(an SQLite file and a W&B folder each, its own W&B service), started and ended as in section 3 (or 3b).

    python benchmarks/lockstep.py --worker trainer:b --window 80 ...   # one process (the coordinator starts it)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
#: A worker that says nothing for this long has hung: the benchmark stops instead of waiting forever.
ANSWER_SECONDS = 600
#: Untimed cycles before the timed ones, in each round (run.py sizes the corpus with it).
WARMUP_CYCLES = 2
_OUT = sys.stdout  # a worker's messages to the coordinator (main() moves everything else to stderr)


class Worker:
    """One variant's process, on a turn only when told."""

    def __init__(self, mode: str, kind: str, folder: str, args: list[str]):
        os.makedirs(folder, exist_ok=True)
        env = dict(os.environ, WANDB_DIR=folder, MLFLOW_TRACKING_URI=f"sqlite:///{folder}/mlflow.db",
                   STREAM_METRICS_SPILL_DIR=os.path.join(folder, "undelivered"))
        # Its own W&B service, as a user's training process has: not the one the coordinator may have
        # started (sections 2 and 3), whose address W&B leaves in the environment.
        env.pop("WANDB_SERVICE", None)
        self.kind = kind
        self.frozen: list[int] = []
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

    def freeze(self) -> None:
        """Stop this variant's process and every process under it (our senders, W&B's service, the
        data loader's workers) until its next turn: its background work can only run in its own turns."""
        self.frozen = process_tree(self.proc.pid)
        for pid in self.frozen:  # the parent first: it starts no process once stopped
            _signal(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in reversed(self.frozen):
            _signal(pid, signal.SIGCONT)
        self.frozen = []

    def turn(self) -> tuple[float, float]:
        self.thaw()
        self.tell({"do": "turn"})
        got = self.expect("turn")
        self.freeze()
        return got["wall"], got["cpu"]

    def stop(self, timeout: float = 180) -> None:
        self.thaw()
        self.tell({"do": "stop"})
        self.expect("stopped")
        self.proc.wait(timeout=timeout)


def bracketed(kinds: list, base: str, one, repeats: int, say) -> dict:
    """Run each kind between two runs of ``base`` (base, k1, base, k2, base, ...), the kinds' order
    rotated each repeat. A kind's ratio is its time over the mean of the two base runs beside it, so
    a slow stretch of this shared machine weighs on both sides of the ratio it falls in.

    ``one(kind)`` returns (time, CPU time): of a whole run (run.py's sections 3 and 3b) or of a
    turn (here). Returns the times, and the ratios of the times and of the CPU per kind, one per repeat.
    """
    times: dict = {k: [] for k in (base, *kinds)}
    cpus: dict = {k: [] for k in (base, *kinds)}
    ratios: dict = {k: [] for k in kinds}
    cpu_ratios: dict = {k: [] for k in kinds}

    def timed(kind):
        ms, cpu_ms = one(kind)
        times[kind].append(ms)
        cpus[kind].append(cpu_ms)
        return ms, cpu_ms

    for repeat in range(repeats):
        order = kinds[repeat % len(kinds):] + kinds[:repeat % len(kinds)]
        before = timed(base)
        for kind in order:
            ms, cpu_ms = timed(kind)
            after = timed(base)
            ratios[kind].append(ms / ((before[0] + after[0]) / 2))
            cpu_ratios[kind].append(cpu_ms / ((before[1] + after[1]) / 2))
            before = after
        say(repeat, {k: v[-1] for k, v in times.items()})
    return {"times": times, "ratios": ratios, "cpu_ratios": cpu_ratios}


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it, parents before their children (from /proc)."""
    children: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:  # it ended meanwhile
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # "pid (name) state ppid ..."
            children.setdefault(ppid, []).append(int(entry))
    tree, i = [pid], 0
    while i < len(tree):
        tree.extend(children.get(tree[i], ()))
        i += 1
    return tree


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def interleave(mode: str, base: str, kinds: list[str], cycles: int, warmup_cycles: int, window: int, workdir: str,
               args: list[str], say=print) -> dict:
    """Start one process per variant, then ``bracketed`` turns of theirs: ``warmup_cycles`` untimed
    cycles, then ``cycles`` more. Returns bracketed's times (of a turn, in seconds) and ratios."""
    workers = {k: Worker(mode, k, os.path.join(workdir, f"lockstep-{mode}-{k}"), ["--window", str(window), *args])
               for k in (base, *kinds)}

    def progress(cycle, _last):
        if cycle % 10 == 9:
            say(f"    lock-step {mode}, cycle {cycle + 1}/{cycles}")

    try:
        for w in workers.values():
            w.expect("ready")
            w.freeze()
        bracketed(kinds, base, lambda kind: workers[kind].turn(), warmup_cycles, lambda *_: None)
        got = bracketed(kinds, base, lambda kind: workers[kind].turn(), cycles, progress)
        for w in workers.values():
            w.stop()
    finally:
        for w in workers.values():
            w.thaw()  # a stopped child of a killed worker would stay stopped for ever
            if w.proc.poll() is None:
                w.proc.kill()
    return got


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median of the population ``values`` come from:
    (low, high, its coverage), two order statistics chosen so that the true median lies between them
    with probability ``coverage >= level`` (the sign test's binomial; no assumption about the noise's
    shape). With too few values for ``level`` it is their whole range, at the coverage that has.

    >>> median_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    (2.0, 9.0, 0.978515625)
    """
    xs = sorted(values)
    n = len(xs)

    def coverage(j: int) -> float:  # P(the j-th lowest <= median <= the j-th highest): a fair coin's binomial
        return 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2 ** n

    j = 1
    while j < n // 2 and coverage(j + 1) >= level:
        j += 1
    return xs[j - 1], xs[n - j], coverage(j)


def measure(mode: str, base: str, kinds: list[str], rounds: int, cycles: int, window: int, workdir: str,
            args: list[str], pairs=(), warmup_cycles: int = WARMUP_CYCLES, say=print) -> dict:
    """``rounds`` lock-step interleavings, each with fresh processes (a process's own speed differs from
    another's running the same code by a few percent: where its memory landed, which core it began on).

    Returns, per kind (and per pair ``(k1, k2)``: k1's ratio over k2's in the same cycle): each round's
    median ratio to the base, wall and CPU; the median of those (the figure); the spread of the round
    medians, and a confidence interval of their median, coverage at least 95% (``median_interval``); and the median turn
    in ms per step.
    """
    rounds_wall: dict = {k: [] for k in (*kinds, *(f"{x}/{y}" for x, y in pairs))}
    rounds_cpu: dict = {k: [] for k in kinds}
    turns: dict = {k: [] for k in (base, *kinds)}
    for i in range(rounds):
        got = interleave(mode, base, kinds, cycles, warmup_cycles, window, os.path.join(workdir, f"round-{i}"),
                         args, say)
        for k in kinds:
            rounds_wall[k].append(statistics.median(got["ratios"][k]))
            rounds_cpu[k].append(statistics.median(got["cpu_ratios"][k]))
        for x, y in pairs:
            rounds_wall[f"{x}/{y}"].append(statistics.median([a / b for a, b in zip(got["ratios"][x],
                                                                                      got["ratios"][y])]))
        for k, v in got["times"].items():
            turns[k].extend(t / window * 1e3 for t in v)
        say(f"    lock-step {mode}, round {i + 1}/{rounds}: "
            + ", ".join(f"{k} {v[-1]:.3f}" for k, v in rounds_wall.items()))
    return {"ratio": {k: statistics.median(v) for k, v in rounds_wall.items()}, "rounds": rounds_wall,
            "spread": {k: (min(v), max(v)) for k, v in rounds_wall.items()},
            "interval": {k: median_interval(v) for k, v in rounds_wall.items()},
            "cpu_ratio": {k: statistics.median(v) for k, v in rounds_cpu.items()},
            "per_step": {k: statistics.median(v) for k, v in turns.items()},
            "settings": {"rounds": rounds, "cycles": cycles, "window": window, "warmup_cycles": warmup_cycles}}


# ---------------------------------------------------------------------------------------------- the workers
def _say(word: str, **fields) -> None:
    _OUT.write(json.dumps({"say": word, **fields}) + "\n")
    _OUT.flush()


def _next_order() -> str:
    line = sys.stdin.readline()
    return json.loads(line)["do"] if line else "stop"


def trainer_worker(kind: str, window: int, warmup: int, folder: str, corpus: str) -> None:
    """Section 3's kinds (run.trainer_variant), a turn every ``window`` steps after ``warmup``."""
    import torch
    from run import trainer_variant
    from streaming_trainer import build_trainer
    from transformers import TrainerCallback

    torch.set_num_threads(int(os.environ.get("STREAM_METRICS_BENCH_THREADS", "1")))
    os.environ["MLFLOW_EXPERIMENT_NAME"] = os.environ["WANDB_PROJECT"] = "bench_lockstep"
    ours, extra = trainer_variant(kind)

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

    trainer, _ = build_trainer(os.path.join(folder, "out"), max_steps=10 ** 7, batch_size=8, grad_accum=2,
                               data=sorted(os.path.join(corpus, f) for f in os.listdir(corpus)),
                               callbacks=[c for c in (ours, Turns()) if c is not None], logging_steps=5, **extra)
    trainer.train()
    if kind == "c":  # the Trainer's W&B integration leaves its run open
        import wandb

        wandb.finish()
    _say("stopped")


def plain_worker(kind: str, window: int, folder: str) -> None:
    """Section 3b's kinds (run.PLAIN_KINDS) and bare, a row every step."""
    import torch
    from run import plain_run, realistic_batch, tiny_training_step

    torch.set_num_threads(int(os.environ.get("STREAM_METRICS_BENCH_THREADS", "1")))
    batch = {k: v[:, :128] for k, v in realistic_batch().items()}
    _, train_step = tiny_training_step(batch)
    for _ in range(5):
        train_step()
    # bare, bare2, ...: the same loop in another process
    run = None if kind.startswith("bare") else plain_run(kind, batch, train_step)
    _say("ready")
    while _next_order() == "turn":
        t, cpu = time.perf_counter(), time.process_time()
        for _ in range(window):
            loss = train_step()
            if run is not None:
                run.update(batch)
                run.log({"loss": loss.detach(), "learning_rate": 3e-4})
        _say("turn", wall=time.perf_counter() - t, cpu=time.process_time() - cpu)
    if run is not None:
        run.finish()
    _say("stopped")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", required=True, help="mode:kind, e.g. trainer:b or plain:ours")
    parser.add_argument("--folder", required=True)
    parser.add_argument("--window", type=int, default=80)
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
