"""The user-facing contract: every key, tag and user-typed name, spelled once.

Nothing else in the package writes a key as a string literal; it imports it from here.
They follow the project's contract, SCHEMA.md version 1.1 (kept beside the repository, not in it;
its "section N" is cited below); for users, the README's "What every row carries" and docs/ say
what each key means.
"""
from __future__ import annotations

SCHEMA_VERSION = "1.1"

# Progress axes (SCHEMA section 1).
STEP = "progress/step"
SAMPLES = "progress/samples"
TOKENS = "progress/tokens"
EPOCH = "progress/epoch"
WALL_CLOCK = "progress/wall_clock"
LOSS_TOKENS = "progress/loss_tokens"
SAMPLES_PER_S = "throughput/samples_per_s"
TOKENS_PER_S = "throughput/tokens_per_s"
FLOPS = "progress/flops"
FLOPS_PER_S = "throughput/flops_per_s"
TOKENS_PER_S_PER_DEVICE = "throughput/tokens_per_s_per_device"
MFU = "throughput/mfu"

AXIS_PREFIX = "progress/"
REQUIRED_AXES = (STEP, SAMPLES, TOKENS, EPOCH, WALL_CLOCK)
INTEGER_AXES = frozenset({STEP, SAMPLES, TOKENS, LOSS_TOKENS})

# The names users type for an axis (x_axis=..., mlflow_step=...), and the key each stands for.
AXES = {
    "step": STEP,
    "samples": SAMPLES,
    "tokens": TOKENS,
    "epoch": EPOCH,
    "wall_clock": WALL_CLOCK,
    "flops": FLOPS,
}
# MLflow steps are int64: only the integer axes can be a row's step (FLOPs pass int64's range).
MLFLOW_STEP_AXES = ("samples", "step", "tokens")

# Run metadata (SCHEMA section 3). MLflow: tags named TAG_PREFIX + name; W&B: config[CONFIG_KEY][name].
TAG_PREFIX = "stream_metrics."
CONFIG_KEY = "stream_metrics"
TAG_VERSION = "version"
TAG_X_AXIS = "x_axis"
TAG_MLFLOW_STEP = "mlflow_step"
TAG_EPOCH_SOURCE = "epoch_source"
# How ranks' counts were reduced: the data-parallel size, and whether it was given or detected (layout.py).
TAG_DATA_PARALLEL = "data_parallel"
TAG_FLOPS_METHOD = "flops_method"   # how progress/flops is counted (flops.py)
TAG_PEAK_FLOPS = "peak_flops"       # the peak FLOP/s per device behind throughput/mfu, and its source
# MLflow only: "resumed_at.<mlflow step of a checkpoint>" = the time (Unix ms) a session went on from
# it. Rows logged before then at later steps were of a branch the checkpoint discarded: readers
# (compare, check) leave them out, as MLflow keeps every point ever logged.
TAG_RESUMED_AT = "resumed_at."

# Epoch sources (SCHEMA section 2), best first.
EPOCH_SOURCES = ("pass", "sized", "user", "metadata", "shards", "none")

BACKENDS = ("mlflow", "wandb")

# Hugging Face Trainer names (SCHEMA section 5).
HF_SUMMARY_KEYS = frozenset({"train_runtime", "train_samples_per_second", "train_steps_per_second",
                             "total_flos", "train_loss"})
HF_DROPPED_KEYS = frozenset({"epoch"})  # the Trainer's epoch is progress towards max_steps, not passes
# The Trainer's log entries (console, state.log_history) carry these figures of ours (rewrite_logs).
HF_LOG_AXES = {"epoch": EPOCH, "samples": SAMPLES, "tokens": TOKENS}
_HF_PREFIXES = (("eval_", "eval/"), ("test_", "test/"))


def axis_key(name: str, *, allowed=tuple(AXES), what: str = "x_axis") -> str:
    """The progress key for a user-typed axis name: ``axis_key("samples") == "progress/samples"``.

    Accepts the full key too (``"progress/samples"``).
    """
    if isinstance(name, str):
        short = name[len(AXIS_PREFIX):] if name.startswith(AXIS_PREFIX) else name
        if short in allowed:
            return AXES[short]
    raise ValueError(f"{what}={name!r} is not a progress axis: use one of {', '.join(repr(a) for a in allowed)}")


def tag_name(name: str) -> str:
    """The MLflow tag for a metadata name: ``tag_name("x_axis") == "stream_metrics.x_axis"``."""
    return TAG_PREFIX + name


def hf_metric_name(key: str) -> str:
    """Map a Hugging Face Trainer log key to its stream_metrics name (SCHEMA section 5)."""
    for prefix, replacement in _HF_PREFIXES:
        if key.startswith(prefix):
            return replacement + key[len(prefix):]
    return "train/" + key
