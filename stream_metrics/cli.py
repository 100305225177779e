"""The command line: ``stream-metrics compare``, ``show RUN``, ``check RUN...``, ``replay FILE``.

    stream-metrics compare bs8 bs32 --mlflow-uri sqlite:///mlflow.db --at 50k
    stream-metrics compare wandb/ --axis tokens --smooth 20000 --log-y
    stream-metrics show bs8
    stream-metrics check bs8 wandb/latest-run --expect-samples 400
    stream-metrics replay stream_metrics_undelivered/mlflow-abc-123.jsonl

Every failure a user can fix ends with one sentence on stderr and a non-zero exit status.
"""
from __future__ import annotations

import argparse
import json
import re
import os
import sys

from . import _checks, schema
from . import compare as comparing
from .version import __version__

_RUNS_HELP = ("MLflow run ids or run names, W&B run folders (or their .wandb files), or a folder of W&B runs "
              "such as wandb/")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream-metrics",
                                     description="Look at runs logged by stream_metrics, by the data they have seen.")
    parser.add_argument("--version", action="version", version=f"stream_metrics {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def mlflow_option(p, help="where MLflow runs are read: a sqlite:/// URI, a SQLite file, or a server URL "
                              "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"):
        p.add_argument("--mlflow-uri", metavar="URI", help=help)

    p = commands.add_parser("compare", help="plot and tabulate runs side by side on a progress axis",
                            description="Plot runs side by side on samples, tokens, epochs, steps or wall-clock, "
                                        "and tabulate each metric at equal amounts of data.")
    p.add_argument("runs", nargs="*", metavar="RUN", help=_RUNS_HELP)
    mlflow_option(p)
    p.add_argument("--experiment", action="append", default=[], metavar="NAME",
                   help="add every run of this MLflow experiment (repeatable)")
    p.add_argument("--metric", action="append", metavar="KEY",
                   help=f"a metric to compare (repeatable; default {comparing.DEFAULT_METRIC})")
    p.add_argument("--axis", default="samples", choices=list(schema.AXES), help="the x-axis (default samples)")
    p.add_argument("--at", action="append", default=[], metavar="AMOUNT",
                   help="also tabulate at this amount of the axis: 50000, 50k, 1.5M, or with the axis's unit "
                        "(50ksp, 2Mtok, 0.5ep, 30min) (repeatable)")
    p.add_argument("--smooth", metavar="HALF_LIFE",
                   help="smooth the plotted lines: an average whose weights halve every HALF_LIFE of the axis, "
                        "e.g. 2000 or 2k (the table is never smoothed)")
    p.add_argument("--log-x", action="store_true", help="logarithmic x-axis")
    p.add_argument("--log-y", action="store_true", help="logarithmic y-axis")
    p.add_argument("--out", default="compare", metavar="DIR",
                   help="folder for compare.png, compare.html, table.csv and table.md (default ./compare)")
    p.add_argument("--no-png", action="store_true", help="skip the PNG (it needs matplotlib)")

    p = commands.add_parser("show", help="one run's axes, epoch source, throughput and final metrics",
                            description="One run's axes, epoch source, throughput and final metrics, as stored.")
    p.add_argument("run", metavar="RUN", help="an MLflow run id or name, or a W&B run folder")
    mlflow_option(p)

    p = commands.add_parser("check", help="check stored runs against the stream_metrics contract",
                            description="Read runs back from MLflow or W&B and check that every row carries every "
                                        "progress axis, that no axis goes down, and the run's tags; with --expect-*, "
                                        "the last row's totals too. Exit status 0: conformant, 1: not, 2: usage.")
    p.add_argument("runs", nargs="*", metavar="RUN", help=_RUNS_HELP)
    mlflow_option(p)
    p.add_argument("--experiment", action="append", default=[], metavar="NAME",
                   help="check every run of this MLflow experiment (repeatable)")
    for axis in ("samples", "tokens", "steps"):
        p.add_argument(f"--expect-{axis}", type=_whole_number, metavar="N",
                       help=f"the {axis} the last row must hold (your own count of the data)")
    p.add_argument("--expect-epoch", type=_epoch, metavar="X", help="the epoch the last row must hold (within 1e-6)")
    p.add_argument("--dump", action="store_true", help="also print every stored row, one JSON object a line")

    p = commands.add_parser("replay", help="send rows saved while a backend was failing into their run",
                            description="Send the rows a backend could not take (saved in a file named by the "
                                        "'could not be delivered' warning) into their run.")
    p.add_argument("file", metavar="FILE", help="a file named in the 'could not be delivered' warning")
    mlflow_option(p, "where the MLflow run is (default: $MLFLOW_TRACKING_URI, else the URI "
                     "saved in the file)")
    p.add_argument("--tracking-uri", dest="mlflow_uri", help=argparse.SUPPRESS)  # the old name, still accepted
    _add_run_parser(commands)
    return parser


def _whole_number(text: str) -> int:
    try:
        return _checks.whole_number("a count", float(text) if "." in text or "e" in text.lower() else int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0") from None


def _epoch(text: str) -> float:
    try:
        return _checks.non_negative("an epoch", float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0") from None


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 on success)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2
    if args.command in ("compare", "show", "check"):
        # Reading a server that does not answer: a few retries, not MLflow's minutes of them (a
        # user's own settings win).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    try:
        return {"compare": _compare, "show": _show, "check": _check, "replay": _replay, "run": _run}[args.command](args)
    except comparing.CompareError as exc:
        print(f"stream-metrics: {exc}", file=sys.stderr)
        return 2 if args.command == "check" else 1  # check: 1 means "read, and not conformant"
    except BrokenPipeError:  # the reader went away (`| head -1`): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush of stdout at exit would raise again
        return 141  # what a shell reports for a process ended by SIGPIPE
    except Exception as exc:  # a store that cannot be read (a server away): one sentence, no password
        if type(exc).__module__.split(".")[0] not in ("mlflow", "requests", "urllib3", "sqlalchemy"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"stream-metrics: could not read the runs ({type(exc).__name__}: {_no_credentials(first)[:300]}); "
              "check the tracking URI and that its server answers", file=sys.stderr)
        return 2 if args.command == "check" else 1


def _no_credentials(text: str) -> str:
    """``text`` with any ``user:password@`` in a URL taken out."""
    return re.sub(r"//[^/@\s]+@", "//", text)


def _compare(args) -> int:
    runs = comparing.read_runs(args.runs, args.mlflow_uri, args.experiment)
    result = comparing.compare(runs, args.metric or [comparing.DEFAULT_METRIC], args.axis, args.smooth, args.at)
    print(comparing.table_text(result))
    os.makedirs(args.out, exist_ok=True)
    written = []

    def path(name):
        written.append(os.path.join(args.out, name))
        return written[-1]

    comparing.write_html(result, path("compare.html"), args.log_x, args.log_y)
    comparing.write_csv(result, path("table.csv"))
    with open(path("table.md"), "w") as f:
        f.write(comparing.table_markdown(result))
    if not args.no_png:
        try:
            comparing.write_png(result, os.path.join(args.out, "compare.png"), args.log_x, args.log_y)
            written.insert(0, os.path.join(args.out, "compare.png"))
        except comparing.CompareError as exc:
            # The HTML page and the tables do not need matplotlib: keep them, and say what is missing.
            print(f"\nwrote {', '.join(written)}", file=sys.stderr)
            raise comparing.CompareError(f"no PNG: {exc} (or pass --no-png)") from None
    print(f"\nwrote {', '.join(written)}")
    return 0


def _show(args) -> int:
    runs = comparing.read_runs([args.run], args.mlflow_uri)
    if len(runs) > 1:
        raise comparing.CompareError(f"{args.run!r} holds {len(runs)} runs ({', '.join(r.label for r in runs)}): "
                                     "show takes one run folder")
    print(comparing.describe(runs[0]))
    return 0


def _check(args) -> int:
    from . import check

    expect = check.Expected(args.expect_samples, args.expect_tokens, args.expect_steps, args.expect_epoch)
    runs = comparing.read_runs(args.runs, args.mlflow_uri, args.experiment)
    found = []
    for run in runs:
        if args.dump:
            for step, row in zip(run.steps or [None] * len(run.rows), run.rows):
                print(json.dumps({"run": run.run_id, **row, **({"_step": step} if step is not None else {})}))
        print(check.describe_run(run))
        found += [f"{run.backend} run {run.run_id}: {problem}" for problem in check.problems(run, expect)]
    if found:
        print(f"NOT conformant, {len(found)} problem(s):")
        print("\n".join(f"  {problem}" for problem in found))
        return 1
    print(f"conformant: {len(runs)} run(s)")
    return 0


def _replay(args) -> int:
    from .backends.spill import SpillFileError, replay_file

    if not os.path.isfile(args.file):
        raise comparing.CompareError(f"there is no file {args.file!r} to replay")
    try:
        sent, where = replay_file(args.file, tracking_uri=args.mlflow_uri)
    except SpillFileError as exc:
        raise comparing.CompareError(f"cannot replay: {exc}") from None
    except Exception as exc:  # the backend is still away, or the run is gone: say so in one sentence
        from .redact import redact_uri

        reason = redact_uri(f"{type(exc).__name__}: {exc}")[:300]
        raise comparing.CompareError(f"could not replay {args.file} ({reason}); the file is kept, with a note of "
                                     "what was stored: run the same command again once the backend is reachable "
                                     "(or what the error names is put right)") from None
    print(f"sent {sent} row(s) from {args.file} into {where}")
    return 0


def _add_run_parser(commands) -> None:
    p = commands.add_parser(
        "run", help="run COMMAND with StreamMetricsCallback in every Hugging Face Trainer it builds",
        description="Run COMMAND (python, torchrun, accelerate launch, llamafactory-cli, trl, ...) so that every "
                    "Hugging Face Trainer built in it, or in any Python process it starts, gets "
                    "StreamMetricsCallback with these options: no code to change. Each option can also be set "
                    "as an environment variable (shown in brackets). COMMAND replaces this process: its exit "
                    "status and the signals sent to it are its own.",
        usage="stream-metrics run [options] -- COMMAND [ARG ...]")
    from ._startup.sitecustomize import ENVIRONMENT

    def option(flag, option, help, **kw):
        p.add_argument(flag, dest=option, help=f"{help} [${ENVIRONMENT[option]}]", **kw)

    option("--backend", "backend", "mlflow, wandb, both as mlflow,wandb, or none (default: what report_to names, "
           "else MLflow where installed)", metavar="B")
    option("--x-axis", "x_axis", "the charts' x-axis (default samples)", choices=list(schema.AXES))
    option("--dataset-size", "dataset_size", "examples in one pass over the training data, where known",
           metavar="N", type=int)
    option("--eval-every", "eval_every", "evaluate each time the run crosses a multiple of this amount "
           "(500ksp, 50Mtok, 0.5ep, 30min)", metavar="X")
    option("--save-every", "save_every", "save a checkpoint each time the run crosses a multiple of this amount",
           metavar="X")
    option("--stop-at", "stop_at", "stop training at this amount, with a final checkpoint", metavar="X")
    option("--mlflow-step", "mlflow_step", "the axis stored as MLflow's step (default samples)",
           choices=list(schema.MLFLOW_STEP_AXES))
    option("--name", "name", "the run's name (default: the Trainer's run_name)", metavar="N")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="the command to run, after --")


def _run(args) -> int:
    """``stream-metrics run``: exec COMMAND with the start-up hook first on PYTHONPATH."""
    from ._startup.sitecustomize import ENVIRONMENT, options_from_environment
    from .autolog import check_options

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        print("stream-metrics: run needs a COMMAND: stream-metrics run [options] -- python train.py", file=sys.stderr)
        return 2
    env = dict(os.environ)
    for option, variable in ENVIRONMENT.items():
        value = getattr(args, option)
        if value is not None:
            env[variable] = str(value)
    try:
        check_options(options_from_environment(env))
    except (ValueError, TypeError, ImportError) as exc:
        print(f"stream-metrics: {exc}", file=sys.stderr)
        return 2
    startup = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_startup")
    # An empty entry is the current folder to Python (`PYTHONPATH=$PYTHONPATH:/x` makes one): kept.
    entries = env["PYTHONPATH"].split(os.pathsep) if env.get("PYTHONPATH") else []
    paths = [p for p in entries if not p or os.path.abspath(p) != startup]
    env["PYTHONPATH"] = os.pathsep.join([startup, *paths])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, env)  # this process becomes COMMAND: same pid, signals, exit status
    except OSError as exc:
        print(f"stream-metrics: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126


if __name__ == "__main__":
    sys.exit(main())
