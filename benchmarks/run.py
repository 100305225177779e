"""What stream_metrics costs a training loop, measured side by side as ratios; writes benchmarks/RESULTS.md.

    python benchmarks/run.py            # about 35 minutes on a busy 2-core machine
    python benchmarks/run.py --quick    # about 10 minutes: fewer steps, calls, repeats and rounds

Every figure is compared with a baseline measured in the same process, interleaved with it: each run
between two runs of the baseline (A B A C A ..., the order rotated each repeat), its ratio taken over
the mean of those two, and repeated; the table shows medians. Section 6 measures the ratios of 3 and 3b
again with each variant in its own process, the processes taking turns of about a second, the others
stopped meanwhile with everything they started (lockstep.py). See
benchmarks/README.md for what each figure means.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # support.py: the MLflow server and the sync counter
for _var, _value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("TOKENIZERS_PARALLELISM", "false"),
                     ("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1")):
    os.environ.setdefault(_var, _value)
for _var in ("MLFLOW_RUN_ID", "WANDB_RUN_ID", "WANDB_RESUME", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
    os.environ.pop(_var, None)

import torch  # noqa: E402

import stream_metrics  # noqa: E402
from lockstep import bracketed  # noqa: E402
from support import MlflowServer, SyncCounter  # noqa: E402

BATCH, SEQ = 8, 512
METRICS = 3  # loss, learning rate, grad norm: what the Trainer logs each row


def median(xs):
    return statistics.median(xs)


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def realistic_batch(seed=0):
    """8 x 512 token ids, right-padded to random lengths, with the mask and the labels a collator makes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 258, (BATCH, SEQ), generator=g)
    lengths = torch.randint(SEQ // 4, SEQ + 1, (BATCH,), generator=g)
    mask = (torch.arange(SEQ).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_training_step(batch: dict):
    """The tiny model, and one optimizer step of it on ``batch`` as a function returning the loss."""
    import tiny

    model = tiny.tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return model, train_step


def trainer_variant(kind: str):
    """Section 3's kinds: (our callback or None, the Trainer's extra arguments). a: no tracking; b: ours,
    MLflow + W&B; c: the Trainer's own W&B and MLflow with its token counter; d: ours, backend none
    (our counting and rows, the training thread's share); e: as b, rows written by threads; m and w:
    ours, MLflow only and W&B only (where b's cost comes from)."""
    from stream_metrics.hf import StreamMetricsCallback

    ours = None
    backends = {"b": ["mlflow", "wandb"], "d": "none", "e": ["mlflow", "wandb"], "m": "mlflow", "w": "wandb"}
    if kind in backends:
        ours = StreamMetricsCallback(backend=backends[kind], progress=False,
                                     **({"mlflow": {"sender": "thread"}, "wandb": {"sender": "thread"}}
                                        if kind == "e" else {}))
    extra = {"report_to": ["wandb", "mlflow"], "include_num_input_tokens_seen": "non_padding"} if kind == "c" else {}
    return ours, extra


# Section 3b's kinds -> (backend, sender): none counts and writes rows without a backend; ours is both
# backends as they come; thread writes both backends' rows from threads of the training process;
# every5: both backends, a row every 5 steps (the Trainer's pacing), update() every step.
PLAIN_KINDS = {"none": ("none", "process"), "mlflow": ("mlflow", "process"), "wandb": ("wandb", "process"),
               "ours": (["mlflow", "wandb"], "process"), "thread": (["mlflow", "wandb"], "thread"),
               "every5": (["mlflow", "wandb"], "process")}


def plain_run(kind: str, batch, train_step, mlflow_uri: str | None = None):
    """Section 3b's run of ``kind``, opened by 5 untimed rows (the first opens the runs in the background)."""
    backend, sender = PLAIN_KINDS[kind]
    run = stream_metrics.init(backend=backend, pad_token_id=0, flush_timeout=120,
                              mlflow={"tracking_uri": mlflow_uri, "experiment": "bench_plain", "sender": sender},
                              wandb={"project": "bench_plain", "sender": sender})
    for _ in range(5):
        run.update(batch)
        run.log({"loss": train_step().detach(), "learning_rate": 3e-4})
    run.flush()
    return run


# ---------------------------------------------------------------------------------------------- 1. update()
def bench_update(cfg) -> dict:

    batch = realistic_batch()
    forms = {"dict": batch, "tuple": (batch["input_ids"], batch["attention_mask"], batch["labels"])}
    model, train_step = tiny_training_step(batch)

    run = stream_metrics.init(backend="none", pad_token_id=0)
    for _ in range(3):
        train_step()
    for form in forms.values():
        for _ in range(200):
            run.update(form)
    step_s, per_call = [], {name: [] for name in forms}
    for _ in range(cfg.repeats_update):  # interleaved: step, dict, tuple, step, dict, tuple, ...
        t = time.perf_counter()
        for _ in range(cfg.steps_update):
            train_step()
        step_s.append((time.perf_counter() - t) / cfg.steps_update)
        for name, form in forms.items():
            t = time.perf_counter()
            for _ in range(cfg.calls_update):
                run.update(form)
            per_call[name].append((time.perf_counter() - t) / cfg.calls_update)
    run.finish()
    step = median(step_s)
    return {"params": sum(p.numel() for p in model.parameters()), "step_ms": step * 1e3,
            **{f"{name}_us": median(v) * 1e6 for name, v in per_call.items()},
            **{f"{name}_share": median(v) / step for name, v in per_call.items()}}


def bench_cold(cfg) -> dict:
    """What a step of the plain loop (3b) costs the training thread, each piece timed right after a training
    step (cold caches, as in training), in turn: the floor an exact count sets (the counting's torch ops on
    the batch and a row's reads of its 0-d counts and loss), and our update() and log() (backend none)."""
    batch = {k: v[:cfg.plain_batch, :cfg.plain_seq] for k, v in realistic_batch().items()}
    mask, labels = batch["attention_mask"], batch["labels"]
    _, train_step = tiny_training_step(batch)
    run = stream_metrics.init(backend="none", pad_token_id=0)
    counts: list = []

    def count() -> None:  # what any exact count of tokens and loss tokens must run: three ops
        counts[:] = [torch.count_nonzero(mask), torch.count_nonzero(labels != -100)]

    pieces = {"ops": count, "reads": lambda: [t.item() for t in counts],
              "update": lambda: run.update(batch), "log": lambda: run.log({"loss": 1.0})}
    for _ in range(5):
        train_step()
    times: dict = {name: [] for name in pieces}
    steps = []
    for _ in range(cfg.cold_steps):
        for name, piece in pieces.items():  # the reads read the counts "ops" made a step earlier
            t = time.perf_counter_ns()
            loss = train_step()
            steps.append(time.perf_counter_ns() - t)
            if name == "reads":
                counts.append(loss.detach())  # the previous piece's counts and this step's loss, as a row has them
            t = time.perf_counter_ns()
            piece()
            times[name].append(time.perf_counter_ns() - t)
    run.finish()
    us = {name: median(v) / 1e3 for name, v in times.items()}
    step_us = median(steps) / 1e3
    return {**{f"{k}_us": v for k, v in us.items()}, "step_ms": step_us / 1e3,
            "floor_share": (us["ops"] + us["reads"]) / step_us, "ours_share": (us["update"] + us["log"]) / step_us}


# ---------------------------------------------------------------------------------------------- 2. log()
def bench_log(cfg, name, backend, options) -> dict:
    """log() as the training thread sees it: rows paced like training, after the runs have started."""
    batch = realistic_batch()
    run = stream_metrics.init(backend=backend, pad_token_id=0, flush_timeout=120, **options)
    metrics = lambda i: {"loss": 1.0 / (i + 1), "learning_rate": 3e-4, "grad_norm": 0.5 + i % 7}  # noqa: E731
    run.update(batch)
    run.log(metrics(0))  # the first row starts the runs, in the background: not measured
    run.flush()
    for i in range(20):
        run.update(batch)
        run.log(metrics(i))
    run.flush()
    paced, burst = [], []
    for i in range(cfg.rows_log):
        time.sleep(cfg.gap_s)  # the training between two rows (the sender may work meanwhile)
        for _ in range(cfg.updates_per_row):  # the micro-batches just before the row
            run.update(batch)
        t = time.perf_counter_ns()
        run.log(metrics(i))
        paced.append((time.perf_counter_ns() - t) / 1e3)
    run.flush()
    for i in range(cfg.rows_log // 2):  # rows back to back: the sender is busy all along (not a target)
        t = time.perf_counter_ns()
        run.log(metrics(i))
        burst.append((time.perf_counter_ns() - t) / 1e3)
    delivered = run.flush()
    rows = sum(d.delivered_rows for d in run.tracking.deliveries)
    run.finish()
    return {"name": name, "median_us": median(paced), "p99_us": percentile(paced, 99), "max_us": max(paced),
            "burst_median_us": median(burst), "burst_p99_us": percentile(burst, 99),
            "rows": len(paced), "delivered": delivered, "delivered_rows": rows}


# ---------------------------------------------------------------------------------------------- 3. Trainer
def bench_trainer(cfg, workdir) -> dict:
    import tiny
    from streaming_trainer import build_trainer
    from transformers import TrainerCallback

    # The demo's corpus generator, with enough lines that the timed steps stay within one pass.
    paths = tiny.write_corpus(os.path.join(workdir, "corpus"), lines_per_file=(2000, 2000, 2000))

    class StartClock(TrainerCallback):
        """Last in the list: starts the clock after `warmup` steps, once every callback has started its runs."""

        def __init__(self, warmup, ours=None):
            self.warmup, self.ours, self.t0, self.train_start = warmup, ours, None, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.warmup:
                if self.ours is not None and self.ours.run is not None:
                    self.ours.run.flush()  # our runs open in the background at the first row: let them
                self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    class EndClock(TrainerCallback):
        """First in the list: stops the clock before any callback's on_train_end (closing runs)."""

        t1 = cpu1 = None

        def on_train_end(self, args, state, control, **kwargs):
            self.t1, self.cpu1 = time.perf_counter(), time.process_time()

    def one(kind: str, repeat: int) -> dict:
        out = os.path.join(workdir, f"trainer-{kind}-{repeat}")
        os.environ["MLFLOW_EXPERIMENT_NAME"] = os.environ["WANDB_PROJECT"] = "bench_trainer"
        ours, extra = trainer_variant(kind)
        start = StartClock(cfg.warmup_steps, ours)
        trainer, _ = build_trainer(out, max_steps=cfg.trainer_steps, batch_size=8, grad_accum=2, data=paths,
                                   callbacks=[c for c in (ours, start) if c is not None], logging_steps=5,
                                   **extra)
        end = EndClock()
        trainer.callback_handler.callbacks.insert(0, end)
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            t = time.perf_counter()  # (the Trainer prints every row: not to the terminal)
            trainer.train()
            whole = time.perf_counter() - t
        if kind == "c":  # the Trainer's W&B integration leaves its run open; a script would end it at exit
            import wandb

            wandb.finish()
        timed_steps = cfg.trainer_steps - cfg.warmup_steps
        result = {"per_step_ms": (end.t1 - start.t0) / timed_steps * 1e3, "train_s": whole,
                  "cpu_per_step_ms": (end.cpu1 - start.cpu0) / timed_steps * 1e3}
        if kind in ("b", "e"):
            result["delivered"] = sum(d.delivered_rows for d in ours.run.tracking.deliveries)
        del trainer
        gc.collect()
        return result

    one("a", -1)  # warm-up: imports, the first wandb service, the dataset cache
    train_s: dict = {k: [] for k in "abcde"}
    repeat_now = [0]

    def timed(kind):
        r = one(kind, repeat_now[0])
        train_s[kind].append(r["train_s"])
        return r["per_step_ms"], r["cpu_per_step_ms"]

    def say(repeat, last):
        repeat_now[0] = repeat + 1
        print(f"    trainer repeat {repeat}: " + ", ".join(f"{k} {v:.1f}" for k, v in last.items()) + " ms/step",
              flush=True)

    # Each of b, c, d, e between two runs of a (no tracking); b/c from the two ratios of one repeat.
    got = bracketed(["b", "c", "d", "e"], "a", timed, cfg.repeats_trainer, say)
    r = got["ratios"]
    ratios = {"b_a": r["b"], "d_a": r["d"], "e_a": r["e"],
              "b_c": [b / c for b, c in zip(r["b"], r["c"])], "e_c": [e / c for e, c in zip(r["e"], r["c"])]}
    return {"per_step": {k: median(v) for k, v in got["times"].items()},
            "train_s": {k: median(v) for k, v in train_s.items()},
            **{name: median(x) for name, x in ratios.items()},
            "spread": {name: (min(x), max(x)) for name, x in ratios.items()}, "runs": got["times"],
            "cpu_ratios": {k: median(v) for k, v in got["cpu_ratios"].items()}}


# ---------------------------------------------------------------------------------------------- 3b. plain loop
def bench_plain(cfg, mlflow_uri) -> dict:
    """A plain training loop of the tiny model, a row every step: bare, and ours with each backend setting,
    each between two bare runs (``bracketed``); log() timed in the loop (rows paced like training)."""

    batch = {k: v[:, :cfg.plain_seq] for k, v in realistic_batch().items()}
    model, train_step = tiny_training_step(batch)

    for _ in range(5):
        train_step()
    log_us: dict = {k: [] for k in PLAIN_KINDS}
    delivery_cpu: dict = {}  # CPU seconds of the row's delivery by where it runs, over ours's timed rows

    def one(kind: str) -> tuple[float, float]:
        """ms per step, and the training process's CPU ms per step."""
        run = None if kind == "bare" else plain_run(kind, batch, train_step, mlflow_uri)
        before = delivery_cpu_s() if kind == "ours" else {}
        t, cpu0 = time.perf_counter(), time.process_time()
        every = 5 if kind == "every5" else 1
        for i in range(cfg.plain_steps):
            loss = train_step()
            if run is not None:
                run.update(batch)
                if i % every:
                    continue
                t_log = time.perf_counter_ns()
                run.log({"loss": loss.detach(), "learning_rate": 3e-4})
                log_us[kind].append((time.perf_counter_ns() - t_log) / 1e3)
        per_step = (time.perf_counter() - t) / cfg.plain_steps
        cpu_per_step = (time.process_time() - cpu0) / cfg.plain_steps
        if kind == "ours":
            run.flush()  # every timed row stored: their storing is in the children's CPU time
            for where, seconds in delivery_cpu_s().items():
                delivery_cpu[where] = delivery_cpu.get(where, 0.0) + seconds - before.get(where, 0.0)
        if run is not None:
            run.finish()
        return per_step * 1e3, cpu_per_step * 1e3

    def say(repeat, last):
        print(f"    plain loop repeat {repeat}: " + ", ".join(f"{k} {v:.2f}" for k, v in last.items()) + " ms/step",
              flush=True)

    got = bracketed(list(PLAIN_KINDS), "bare", one, cfg.repeats_plain, say)
    ratios = got["ratios"]
    return {"per_step": {k: median(v) for k, v in got["times"].items()}, "runs": got["times"], "ratios": ratios,
            "bare": {k: median(v) for k, v in ratios.items()},
            "cpu_ratios": {k: median(v) for k, v in got["cpu_ratios"].items()},
            "log": {k: (median(v), percentile(v, 99), max(v)) for k, v in log_us.items()},
            "rows": len(log_us["ours"]),
            "delivery_ms_per_row": {k: v / len(log_us["ours"]) * 1e3 for k, v in delivery_cpu.items()}}


def delivery_cpu_s() -> dict:
    """CPU seconds used so far by the row's delivery, by where it runs: our sender threads in this process,
    the MLflow and W&B sender processes, and W&B's service (wandb-core, a child of the W&B sender), from
    /proc (Linux; elsewhere empty). A process that ended is no longer counted: read it before finish()."""
    import threading

    from lockstep import process_tree

    tick = os.sysconf("SC_CLK_TCK")

    def cpu(stat_path: str) -> float | None:
        try:
            with open(stat_path) as f:
                stat = f.read()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2:].split()  # "pid (name) state ppid ...": utime, stime are 14, 15
        return (int(fields[11]) + int(fields[12])) / tick

    out: dict = {}
    if not os.path.isdir("/proc/self/task"):
        return out
    for thread in threading.enumerate():
        if thread.name.startswith("stream_metrics-") and thread.native_id is not None:
            seconds = cpu(f"/proc/self/task/{thread.native_id}/stat")
            if seconds is not None:
                out["sender threads"] = out.get("sender threads", 0.0) + seconds
    for pid in process_tree(os.getpid())[1:]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        where = ("MLflow sender" if "_mlflow_child" in command else "W&B sender" if "_wandb_child" in command
                 else "W&B service" if "wandb-core" in command else None)
        seconds = cpu(f"/proc/{pid}/stat") if where else None
        if seconds is not None:
            out[where] = out.get(where, 0.0) + seconds
    return out


# ---------------------------------------------------------------------------------------------- 6. lock-step
def bench_lockstep(cfg, workdir, say=print) -> dict:
    """Sections 3's and 3b's ratios again, each variant in its own process, the processes taking turns
    every few steps (benchmarks/lockstep.py): the machine's drift falls on both sides of each ratio."""
    import lockstep
    import tiny

    kinds = cfg.lockstep_kinds
    # The base runs a turn before and after each kind: enough lines that no process starts a second
    # pass (the streamed dataset's end stalls a Trainer for seconds).
    window = cfg.lockstep_window_trainer
    steps = cfg.warmup_steps + (cfg.lockstep_cycles + lockstep.WARMUP_CYCLES) * (len(kinds) + 1) * window + window
    per_file = steps * 16 // 3 + 500
    corpus = os.path.join(workdir, "lockstep-corpus")
    tiny.write_corpus(corpus, lines_per_file=(per_file, per_file, per_file))
    os.environ["STREAM_METRICS_BENCH_THREADS"] = str(torch.get_num_threads())  # the workers' torch threads
    trainer = lockstep.measure("trainer", "a", kinds, cfg.lockstep_rounds_trainer, cfg.lockstep_cycles,
                               window, os.path.join(workdir, "lockstep"),
                               ["--corpus", corpus, "--warmup", str(cfg.warmup_steps)],
                               pairs=[("b", "c")] if {"b", "c"} <= set(kinds) else [], say=say)
    plain = lockstep.measure("plain", "bare", ["ours", "none"], cfg.lockstep_rounds_plain, cfg.lockstep_cycles,
                             cfg.lockstep_window_plain, os.path.join(workdir, "lockstep"), [], say=say)
    return {"trainer": trainer, "plain": plain}


# ---------------------------------------------------------------------------------------------- 4. memory
def bench_memory(cfg, mlflow_uri) -> dict:
    batch = realistic_batch()
    out = {}
    with stream_metrics.init(backend="none", pad_token_id=0) as run:
        for _ in range(10_000):
            run.update(batch)
        gc.collect()
        before = rss_mb()
        for _ in range(cfg.mem_updates):
            run.update(batch)
        gc.collect()
        out["updates_rss_mb"] = rss_mb() - before
        tracemalloc.start()
        snap = tracemalloc.get_traced_memory()[0]
        for _ in range(cfg.mem_updates // 10):
            run.update(batch)
        gc.collect()
        out["updates_traced_mb"] = (tracemalloc.get_traced_memory()[0] - snap) / 2 ** 20
        tracemalloc.stop()
        run.log({"loss": 1.0})

    with stream_metrics.init(backend="none", pad_token_id=0) as run:
        small = {"input_ids": batch["input_ids"][:2, :16], "attention_mask": batch["attention_mask"][:2, :16]}
        for i in range(2_000):
            run.update(small)
            run.log({"loss": 1.0 / (i + 1), "learning_rate": 3e-4, "grad_norm": 0.5})
        gc.collect()
        before = rss_mb()
        for i in range(cfg.mem_rows):
            run.update(small)
            run.log({"loss": 1.0 / (i + 1), "learning_rate": 3e-4, "grad_norm": 0.5})
        gc.collect()
        out["rows_rss_mb"] = rss_mb() - before
        # Traced apart, over a tenth: tracemalloc's own bookkeeping would show in the RSS otherwise.
        tracemalloc.start()
        snap = tracemalloc.get_traced_memory()[0]
        for i in range(cfg.mem_rows // 10):
            run.update(small)
            run.log({"loss": 1.0 / (i + 1), "learning_rate": 3e-4, "grad_norm": 0.5})
        gc.collect()
        out["rows_traced_mb"] = (tracemalloc.get_traced_memory()[0] - snap) / 2 ** 20
        tracemalloc.stop()

    # A real backend: rows are held until the sender has delivered them, so compare after a flush.
    with stream_metrics.init(backend="mlflow", pad_token_id=0, mlflow={"tracking_uri": mlflow_uri},
                             flush_timeout=300) as run:
        small = {"input_ids": batch["input_ids"][:2, :16], "attention_mask": batch["attention_mask"][:2, :16]}

        def rows(n):
            for i in range(n):
                run.update(small)
                run.log({"loss": 1.0 / (i + 1), "learning_rate": 3e-4, "grad_norm": 0.5})
            run.flush()

        rows(2_000)
        gc.collect()
        before = rss_mb()
        rows(cfg.mem_rows_backend)
        gc.collect()
        out["rows_mlflow_rss_mb"] = rss_mb() - before
    return out


# ---------------------------------------------------------------------------------------------- 5. host syncs
def bench_syncs(cfg) -> dict:
    batch = realistic_batch()
    counted = {k: v.as_subclass(SyncCounter) for k, v in batch.items()}
    forms = {"dict": counted, "tuple": tuple(counted.values())}
    out = {}
    with stream_metrics.init(backend="none", pad_token_id=0) as run:
        for name, form in forms.items():
            SyncCounter.syncs = 0
            for _ in range(cfg.sync_updates):
                run.update(form)
            out[f"{name}_syncs"] = SyncCounter.syncs
        run.log({"loss": 1.0})
    out["updates"] = cfg.sync_updates
    if torch.cuda.is_available():
        cuda = {k: v.cuda() for k, v in batch.items()}
        with stream_metrics.init(backend="none", pad_token_id=0) as run:
            run.update(cuda)
            run.log({"loss": 1.0})
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(cfg.sync_updates):
                    run.update(cuda)
                    run.update((cuda["input_ids"], cuda["attention_mask"]))
                out["gpu"] = f"no sync in {2 * cfg.sync_updates} updates on {torch.cuda.get_device_name()}"
            except RuntimeError as exc:
                out["gpu"] = f"FAILED: {exc}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
            run.log({"loss": 1.0})
    else:
        out["gpu"] = "no GPU here"
    return out


# ---------------------------------------------------------------------------------------------- report
def versions() -> str:
    import importlib.metadata as md

    names = ["torch", "transformers", "datasets", "accelerate", "mlflow", "wandb"]
    found = []
    for n in names:
        with contextlib.suppress(md.PackageNotFoundError):
            found.append(f"{n} {md.version(n)}")
    return f"Python {platform.python_version()}, stream_metrics {stream_metrics.__version__}, " + ", ".join(found)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} CPU cores (load average at the end {load}), torch threads "
            f"{torch.get_num_threads()}, GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")


def verdict(ok: bool) -> str:
    return "holds" if ok else "MISSES"


def table(r, cfg) -> tuple[str, list[bool]]:
    u, t, m, s = r["update"], r["trainer"], r["memory"], r["syncs"]
    lines = ["| # | figure | measured | target | |", "|---|---|---|---|---|"]
    held = []

    def row(num, figure, measured, target="", ok=None):
        if ok is not None:
            held.append(ok)
        lines.append(f"| {num} | {figure} | {measured} | {target} | {'' if ok is None else verdict(ok)} |")

    row("1", f"update(), dict batch ({BATCH} x {SEQ} ids + mask + labels)", f"{u['dict_us']:.1f} µs/call")
    row("1", "update(), tuple batch (ids, mask, labels)", f"{u['tuple_us']:.1f} µs/call")
    row("1", f"tiny model's CPU training step, same batch ({u['params']:,} parameters)", f"{u['step_ms']:.1f} ms")
    row("1", "update() as a share of that step, dict / tuple",
        f"{u['dict_share']:.4%} / {u['tuple_share']:.4%}", "(no target)")
    c = r["cold"]
    row("1", f"right after a training step (cold), plain loop's {cfg.plain_batch} x {cfg.plain_seq} batch: an exact "
        "count's own torch ops (mask and labels != -100 counted) / a row's reads (2 counts and the loss) / update() "
        "/ log(), backend none", f"{c['ops_us']:.0f} / {c['reads_us']:.0f} / {c['update_us']:.0f} / "
        f"{c['log_us']:.0f} µs", "(no target)")
    row("1", f"the floor an exact count sets on that loop's {c['step_ms']:.2f} ms step (its ops and reads); our "
        "update() and log()", f"{c['floor_share']:.2%}; {c['ours_share']:.2%}", "(no target)")
    for b in r["log"]:
        row("2", f"log() {b['name']}, {cfg.gap_s * 1e3:.0f} ms between rows: median / p99 / max",
            f"{b['median_us']:.0f} / {b['p99_us']:.0f} / {b['max_us']:.0f} µs", "(no target)")
    for b in r["log"]:
        row("2", f"log() {b['name']}, rows back to back (no pacing): median / p99",
            f"{b['burst_median_us']:.0f} / {b['burst_p99_us']:.0f} µs", "(no target)")
    ps = t["per_step"]
    row("3", "Trainer (a) no tracking", f"{ps['a']:.1f} ms/step")
    row("3", "Trainer (b) StreamMetricsCallback, MLflow + W&B", f"{ps['b']:.1f} ms/step")
    row("3", "Trainer (c) report_to=[wandb, mlflow] + include_num_input_tokens_seen", f"{ps['c']:.1f} ms/step")
    row("3", "Trainer (d) StreamMetricsCallback, backend none (counting and rows only)", f"{ps['d']:.1f} ms/step")
    row("3", "Trainer (e) as (b), rows written by a thread of the training process (sender='thread')",
        f"{ps['e']:.1f} ms/step")
    sp = t["spread"]
    row("3", "b / a (spread over repeats)", f"{t['b_a']:.3f} ({sp['b_a'][0]:.3f}-{sp['b_a'][1]:.3f})", "<= 1.02",
        t["b_a"] <= 1.02)
    row("3", "b / c (spread over repeats)", f"{t['b_c']:.3f} ({sp['b_c'][0]:.3f}-{sp['b_c'][1]:.3f})", "<= 0.85",
        t["b_c"] <= 0.85)
    for name in ("d_a", "e_a", "e_c"):
        row("3", f"{name.replace('_', ' / ')} (spread over repeats)",
            f"{t[name]:.3f} ({sp[name][0]:.3f}-{sp[name][1]:.3f})", "(no target)")
    cr = t["cpu_ratios"]
    row("3", "training process CPU time per step, b / a, c / a, d / a, e / a "
        "(W&B's service and the sender processes not included)",
        f"{cr['b']:.3f}, {cr['c']:.3f}, {cr['d']:.3f}, {cr['e']:.3f}", "(no target)")
    pl = r["plain"]
    pps = pl["per_step"]
    names = {"none": "backend none (counting and rows only)", "mlflow": "MLflow only",
             "wandb": "W&B only",
             "thread": "MLflow + W&B, rows written by a thread of the training process (sender='thread')",
             "every5": "MLflow + W&B, a row every 5 steps"}
    row("3b", f"plain loop ({cfg.plain_batch} x {cfg.plain_seq} batch), bare", f"{pps['bare']:.2f} ms/step")
    lo, hi = min(pl["ratios"]["ours"]), max(pl["ratios"]["ours"])
    row("3b", "plain loop, ours (MLflow + W&B, a row every step) / bare (spread over repeats)",
        f"{pl['bare']['ours']:.3f} ({lo:.3f}-{hi:.3f})", "<= 1.02", pl["bare"]["ours"] <= 1.02)
    for kind, name in names.items():
        lo, hi = min(pl["ratios"][kind]), max(pl["ratios"][kind])
        row("3b", f"plain loop, ours with {name} / bare (spread over repeats)",
            f"{pl['bare'][kind]:.3f} ({lo:.3f}-{hi:.3f})", "(no target)")
    cr = pl["cpu_ratios"]
    row("3b", "plain loop, training process CPU time per step / bare: " + ", ".join(cr),
        ", ".join(f"{v:.3f}" for v in cr.values()), "(no target)")
    median_us, p99_us, max_us = pl["log"]["ours"]
    row("3b", f"log() in that loop, MLflow + W&B, {pl['rows']:,} rows: median", f"{median_us:.0f} µs",
        "< 100 µs", median_us < 100)
    row("3b", "log() in that loop: p99 / max", f"{p99_us:.0f} / {max_us:.0f} µs", "p99 < 500 µs", p99_us < 500)
    spent = pl.get("delivery_ms_per_row") or {}
    if spent:
        row("3b", "CPU time per row of ours (MLflow + W&B) delivering it, by where it runs: "
            + ", ".join(spent) + " (the processes beside the training process share the machine's other core)",
            ", ".join(f"{v:.3f}" for v in spent.values()) + " ms", "(no target)")
    row("3b", "log() in that loop, median / p99, with: " + ", ".join(names),
        ", ".join(f"{pl['log'][k][0]:.0f} / {pl['log'][k][1]:.0f}" for k in names) + " µs", "(no target)")
    ls = r["lockstep"]
    lt, lp = ls["trainer"], ls["plain"]

    def figure(got, key):
        lo, hi = got["spread"][key]
        return f"{got['ratio'][key]:.3f} ({lo:.3f}-{hi:.3f})"

    def interval(got, key, target):
        """The figure, its spread and its median's confidence interval; whether that holds the target."""
        lo, hi, coverage = got["interval"][key]
        if coverage < 0.9:  # too few rounds (--quick) for an interval worth the name
            return f"{figure(got, key)}; no CI from {got['settings']['rounds']} round(s)"
        inside = " (the target is inside it)" if lo <= target <= hi else ""
        return f"{figure(got, key)}; {coverage:.0%} CI {lo:.3f}-{hi:.3f}{inside}"

    row("6", f"lock-step Trainer, b / a (median of {lt['settings']['rounds']} rounds' medians; their spread; "
             "a confidence interval (CI) of that median)",
        interval(lt, "b", 1.02), "<= 1.02", lt["ratio"]["b"] <= 1.02)
    row("6", "lock-step Trainer, b / c", interval(lt, "b/c", 0.85), "<= 0.85", lt["ratio"]["b/c"] <= 0.85)
    row("6", "lock-step Trainer, c / a, d / a", f"{figure(lt, 'c')}, {figure(lt, 'd')}", "(no target)")
    row("6", "lock-step Trainer, training process CPU time per turn, b / a, c / a, d / a",
        ", ".join(f"{lt['cpu_ratio'][k]:.3f}" for k in ("b", "c", "d")), "(no target)")
    row("6", f"lock-step plain loop, ours (MLflow + W&B, a row every step) / bare ({lp['settings']['rounds']} rounds)",
        interval(lp, "ours", 1.02), "<= 1.02", lp["ratio"]["ours"] <= 1.02)
    row("6", "lock-step plain loop, ours with backend none / bare; CPU time per turn, ours / bare, none / bare",
        f"{figure(lp, 'none')}; {lp['cpu_ratio']['ours']:.3f}, {lp['cpu_ratio']['none']:.3f}", "(no target)")
    row("6", "lock-step median turn, ms per step: Trainer a, b, c, d; plain loop bare, ours, none",
        ", ".join(f"{v:.2f}" for v in (*lt["per_step"].values(), *lp["per_step"].values())), "(no target)")
    row("4", f"RSS growth over {cfg.mem_updates:,} update() calls", f"{m['updates_rss_mb']:+.2f} MB", "< 5 MB",
        m["updates_rss_mb"] < 5)
    row("4", f"traced (tracemalloc) growth over {cfg.mem_updates // 10:,} update() calls",
        f"{m['updates_traced_mb']:+.3f} MB", "< 5 MB", m["updates_traced_mb"] < 5)
    row("4", f"RSS / traced growth over {cfg.mem_rows:,} / {cfg.mem_rows // 10:,} rows (backend none)",
        f"{m['rows_rss_mb']:+.2f} / {m['rows_traced_mb']:+.3f} MB", "< 5 MB",
        max(m["rows_rss_mb"], m["rows_traced_mb"]) < 5)
    row("4", f"RSS growth over {cfg.mem_rows_backend:,} rows delivered to MLflow (SQLite)",
        f"{m['rows_mlflow_rss_mb']:+.2f} MB", "< 5 MB", m["rows_mlflow_rss_mb"] < 5)
    row("5", f"host syncs in {s['updates']:,} update() calls between rows, dict / tuple",
        f"{s['dict_syncs']} / {s['tuple_syncs']}", "0", s["dict_syncs"] == 0 and s["tuple_syncs"] == 0)
    row("5", "CUDA, set_sync_debug_mode('error') between rows", s["gpu"], "no error",
        None if s["gpu"] == "no GPU here" else not s["gpu"].startswith("FAILED"))
    return "\n".join(lines), held


def write_results(path, text_table, held, r, cfg, command, elapsed, load_start, note):
    t, pl = r["trainer"], r["plain"]
    runs = "; ".join(f"{k}: " + ", ".join(f"{x:.1f}" for x in v) for k, v in t["runs"].items())
    ls, lsp = r["lockstep"]["trainer"]["settings"], r["lockstep"]["plain"]["settings"]
    plain_runs = "; ".join(f"{k}: " + ", ".join(f"{x:.2f}" for x in v) for k, v in pl["runs"].items())
    body = f"""# stream_metrics overhead: results

Written by `benchmarks/run.py`; benchmarks/README.md says what each figure means.

- Command: `{command}` ({elapsed:.0f} s)
- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}
- Machine: {machine()}; load average at the start {load_start}
- Versions: {versions()}
- Targets: {sum(held)} of {len(held)} hold{'' if all(held) else ' (see MISSES)'}
{f"- Note: {note}" if note else ""}

{text_table}

Settings: update(): {cfg.repeats_update} interleaved repeats of {cfg.steps_update} training steps and
{cfg.calls_update:,} calls per form. Cold: {cfg.cold_steps} turns of four training steps, each followed by one
piece timed alone (the ops, the reads, update(), log()); medians. log(): {cfg.rows_log} rows per backend with
{cfg.updates_per_row} update() calls and {cfg.gap_s * 1e3:.0f} ms of sleep (the training, during which the sender thread
may work) before each, after 21 warm-up rows; 3 metrics per row. Trainer: the tiny Llama of examples/tiny.py on the
demo's streamed JSONL corpus (6,000 lines), batch 8, gradient accumulation 2, logging every 5 steps,
{cfg.trainer_steps} steps of which the first {cfg.warmup_steps} are warm-up; {cfg.repeats_trainer} repeats, each run
between two runs of a (a b a c a d a e a, then a c a d a e a b a, ...), a ratio taken over the mean of those two; ms
per timed step for each run: {runs}. Whole `trainer.train()` medians, start-up and teardown included (not a target):
{", ".join(f"{k} {v:.1f} s" for k, v in t["train_s"].items())}. Plain loop: the same tiny model on an
{cfg.plain_batch} x {cfg.plain_seq} batch, {cfg.plain_steps} timed steps per run after 5 untimed rows, a row (loss,
learning rate) every step (every 5 steps for every5), {cfg.repeats_plain} repeats, each run between two bare runs, the
order rotated; ms per step for each run: {plain_runs}. Lock-step (section 6, benchmarks/lockstep.py): each variant in
its own process, {ls['rounds']} rounds (Trainer) and {lsp['rounds']} (plain loop) of fresh processes; in each,
{ls['cycles']} cycles (after {ls['warmup_cycles']} untimed) of turns of {ls['window']} steps (plain loop:
{lsp['window']}), the others' process trees stopped meanwhile, the base's turn before and after each other variant's
(a b a c a d a for the Trainer, the order rotated each cycle; bare ours bare none bare for the plain loop); a ratio
per cycle over the mean of the two base turns beside it, the median over cycles per round, and the median over rounds
in the table. The confidence interval of that median is distribution-free (two of the round medians, picked by the
sign test's binomial: lockstep.median_interval); a target inside it is neither shown held nor shown missed by this
run, whatever the verdict, which reads the median alone. Round medians, Trainer:
{rounds_text(r["lockstep"]["trainer"])}; plain loop: {rounds_text(r["lockstep"]["plain"])}.
"""
    if not all(held):
        body += NOTES
    with open(path, "w") as f:
        f.write(body)


def rounds_text(got) -> str:
    return "; ".join(f"{k}: " + ", ".join(f"{x:.3f}" for x in v) for k, v in got["rounds"].items())


NOTES = """
## Why a target misses (what we know)

See "Where the time goes" in benchmarks/README.md for the profiles and probes behind these notes.

- Both backends' rows are written by child processes (W&B's attached to the training process's run),
  so the training thread pays our own `log()` and `update()` and a JSON line per backend a second.
  The lock-step ratios (6), where each variant trains in its own process and the processes take
  turns of about a second, the others stopped meanwhile, charge each variant its own background
  work too (the children's and W&B's service's), with less of the machine's drift.
- The whole-run ratios (3, 3b) also carry what the backends' storage work on the other core costs
  the training on this virtual machine: the training thread is not kept from its core (it waits in
  the run queue for 0.00-0.11 ms a step), but another process's cache, memory and disk traffic
  slows it (MLflow writing into SQLite without pause: about 15%; an fsync loop: 60%; a spin loop:
  nothing). MLflow's store takes about 1 ms of CPU per row of 12 metrics in SQLAlchemy, in our child.
- The machine is shared and virtual: the spread over repeats is as wide as the effects measured,
  and two processes running the same code differ by up to 5% for as long as they live; the medians of
  interleaved ratios are the figures to compare.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps, calls, repeats and rounds (about 10 minutes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine more threads thrash)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    parser.add_argument("--only", default="123456", help="sections to run, e.g. 23 (RESULTS.md needs all)")
    parser.add_argument("--note", default="", help="a line for RESULTS.md (e.g. what else ran on the machine)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="lock-step rounds (section 6) for both the Trainer and the plain loop (default 6 and 8; "
                             "2 each with --quick): more rounds, a figure less moved by the processes' own speeds")
    parser.add_argument("--kinds", default="b,c,d",
                        help="section 6's Trainer variants beside a (run.trainer_variant: b c d e m w); "
                             "RESULTS.md's table needs b,c,d, so others go with --only 6")
    args = parser.parse_args(argv)
    if args.kinds != "b,c,d" and set(args.only) >= set("12345"):
        parser.error("--kinds other than b,c,d is for --only 6: RESULTS.md's table needs b, c and d")
    q = args.quick
    cfg = argparse.Namespace(
        repeats_update=5 if q else 7, steps_update=1 if q else 2, calls_update=500 if q else 2000,
        rows_log=100 if q else 200, updates_per_row=4, gap_s=0.05,
        trainer_steps=60 if q else 250, warmup_steps=10, repeats_trainer=3 if q else 7,
        mem_updates=100_000 if q else 1_000_000, mem_rows=10_000 if q else 100_000,
        mem_rows_backend=2_000 if q else 10_000, sync_updates=1_000,
        plain_steps=150 if q else 400, plain_batch=BATCH, plain_seq=128, repeats_plain=2 if q else 6,
        cold_steps=100 if q else 400,
        lockstep_rounds_trainer=2 if q else 6, lockstep_rounds_plain=2 if q else 8, lockstep_cycles=6 if q else 10,
        lockstep_window_trainer=80, lockstep_window_plain=140, lockstep_kinds=args.kinds.split(","))
    if args.rounds > 0:
        cfg.lockstep_rounds_trainer = cfg.lockstep_rounds_plain = args.rounds
    torch.set_num_threads(args.threads)
    command = "python benchmarks/run.py" + (" --quick" if q else "") + (
        f" --threads {args.threads}" if args.threads != 1 else "") + (
        f" --rounds {args.rounds}" if args.rounds else "") + (f" --kinds {args.kinds}" if args.kinds != "b,c,d" else "")
    started = time.monotonic()
    load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    workdir = tempfile.mkdtemp(prefix="stream_metrics_bench_")
    home = os.getcwd()
    os.chdir(workdir)
    os.environ["WANDB_DIR"] = workdir
    os.environ["STREAM_METRICS_SPILL_DIR"] = os.path.join(workdir, "undelivered")
    os.environ["MLFLOW_TRACKING_URI"] = sqlite = f"sqlite:///{workdir}/mlflow.db"
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("mlflow", "alembic", "transformers", "wandb", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    server = MlflowServer(os.path.join(workdir, "server"))
    results = {}
    try:
        if "2" in args.only:
            server.start(wait=False)  # it starts while section 1 runs
        if "1" in args.only:
            print("1. update() per micro-batch ...", flush=True)
            results["update"] = bench_update(cfg)
            print("   ", {k: round(v, 4) for k, v in results["update"].items()}, flush=True)
            results["cold"] = bench_cold(cfg)
            print("   ", {k: round(v, 4) for k, v in results["cold"].items()}, flush=True)
        if "2" in args.only:
            print("2. log() latency ...", flush=True)
            server.wait_healthy(180)
            results["log"] = []
            for name, backend, options in (("MLflow, SQLite", "mlflow", {"mlflow": {"tracking_uri": sqlite}}),
                                           ("MLflow, server on 127.0.0.1", "mlflow",
                                            {"mlflow": {"tracking_uri": server.url()}}),
                                           ("W&B, offline", "wandb", {})):
                results["log"].append(bench_log(cfg, name, backend, options))
                print("   ", results["log"][-1], flush=True)
            server.stop()
        if "3" in args.only:
            print("3. the Trainer end to end ...", flush=True)
            results["trainer"] = bench_trainer(cfg, workdir)
            print("   ", {k: v for k, v in results["trainer"].items() if k != "runs"}, flush=True)
            print("3b. a plain loop, a row every step ...", flush=True)
            results["plain"] = bench_plain(cfg, sqlite)
            print("   ", {k: v for k, v in results["plain"].items() if k not in ("runs", "ratios")}, flush=True)
        if "6" in args.only:
            print("6. lock-step: sections 3 and 3b, the variants' processes taking turns ...", flush=True)
            results["lockstep"] = bench_lockstep(cfg, workdir)
            for mode, got in results["lockstep"].items():
                print("   ", mode, {k: v for k, v in got.items() if k != "ends"}, flush=True)
        if "4" in args.only:
            print("4. memory ...", flush=True)
            results["memory"] = bench_memory(cfg, sqlite)
            print("   ", results["memory"], flush=True)
        if "5" in args.only:
            print("5. host syncs between rows ...", flush=True)
            results["syncs"] = bench_syncs(cfg)
            print("   ", results["syncs"], flush=True)
    finally:
        server.stop()
        os.chdir(home)
        shutil.rmtree(workdir, ignore_errors=True)
    if len(results) < 7:
        return 0
    text, held = table(results, cfg)
    print()
    print(text)
    print(f"\n{sum(held)} of {len(held)} targets hold.")
    write_results(args.out, text, held, results, cfg, command, time.monotonic() - started, load_start, args.note)
    print(f"written: {os.path.relpath(args.out)}")
    return 0 if all(held) else 1


if __name__ == "__main__":
    sys.exit(main())
