"""Training FLOPs: compute as a progress axis, and the throughput and MFU that follow from it.

Model FLOPs of training (forward and backward, no recomputation), counted per micro-batch from
the model's shape, as torchtitan's ``get_num_flop_per_token`` and OLMo-core's SpeedMonitor do:

    flops = (6 * N_trained + 4 * N_frozen) * T  +  12 * L * d_attn * A

- ``N_trained`` / ``N_frozen``: weights of the model's matrix multiplications (``nn.Linear`` and
  GPT-2's ``Conv1D``, the output head included; embedding look-ups are not multiplications) that
  do / do not take gradients. Forward is 2 per weight and token; backward is 2 for the input's
  gradient plus 2 for the weight's, which a frozen weight (LoRA's base model) does not need.
- ``T``: the tokens in the batch's shape, padding included: padding is computed, so it is spent.
- ``L``, ``d_attn``: layers and query width (heads x head size) from the model's config; the
  attention scores and their product with the values cost 4 * d_attn per (query, key) pair and
  layer forward, 3 times that with backward. The causal half is not subtracted (the convention
  of torchtitan and of ``FlopCounterMode``).
- ``A``: the (query, key) pairs attention computes. Dense kernels (``eager``, ``sdpa``) compute
  every pair of a row, packed or padded: rows x length**2, known from the shape. Variable-length
  kernels (``flash_attention_*``, ``flex_attention``) skip padding and stop at example boundaries:
  the sum of squared example lengths, from ``cu_seq_lens_q``, ``position_ids`` restarts
  (an example of length n has positions 0..n-1, and the sum of 2p+1 over them is n**2) or the
  attention mask; these are device tensors, summed on the device like the token counts.

Not counted: normalisation, activations, softmax, the loss, the optimizer, biases, and anything
recomputed by activation checkpointing (these are model FLOPs, for MFU). A mixture of experts
named by the config counts the ``num_experts_per_tok`` experts a token goes through (fused
``[experts, out, in]`` weights, or one module per expert). Convolutions over images are not read:
pass ``flops_per_token=``.

Shape-derived parts are Python ints (free); value-derived parts are counted in units that fit an
int64 (tokens, (query, key) pairs) and multiplied by the per-unit cost on the host when a row is
written, so totals beyond int64 stay exact and a resumed run continues them exactly.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from . import distributed, schema
from .counting import Count, Total, sequence_form, warn_once
from .record import FlopFields, RankRecord

# Attention kernels that skip padding and stop at example boundaries (transformers' names contain these).
_VARLEN_KERNELS = ("flash", "flex")


@dataclass(frozen=True)
class FlopFormula:
    """The FLOPs of one token and of one (query, key) pair of attention, for one model.

    >>> FlopFormula(per_token=600, per_pair=0).of_tokens(10)
    6000
    """

    per_token: int | float           # 6 * N_trained + 4 * N_frozen, or the user's flops_per_token
    per_pair: int = 0                # 12 * L * d_attn; 0 where the attention is not known
    varlen: bool = False             # the attention kernel skips padding and packed boundaries
    method: str = ""                 # how it was found, for the run's tags

    def of_tokens(self, tokens: int, pairs: int = 0):
        return self.per_token * tokens + self.per_pair * pairs

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> "FlopFormula":
        """Read the formula from a model's weights and config (see the module docstring).

        >>> import torch
        >>> FlopFormula.of_model(torch.nn.Linear(8, 4, bias=False)).per_token   # 6 * 32
        192
        """
        trained = frozen = 0
        skipped = []
        config: Any = getattr(model, "config", None)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        experts, top_k = _experts(config)
        mixture = False
        routed_trained = routed_frozen = 0  # Linear weights of experts held one module each (experts.N.)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Embedding):
                continue
            own = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
            if not own:
                continue
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                # A Linear's logical size: a 4-bit weight (QLoRA) is stored packed, and a DTensor shard's
                # numel() is the whole weight's anyway.
                size = module.in_features * module.out_features if isinstance(module, torch.nn.Linear) else \
                    sum(p.numel() for p in own)
                if experts and _EXPERT.search(name):  # a token goes through top_k of the experts
                    if own[0].requires_grad:
                        routed_trained += size
                    else:
                        routed_frozen += size
                    mixture = True
                    continue
            elif experts and all(p.dim() in (2, 3) and p.shape[0] == experts for p in own):
                # A mixture of experts (transformers' fused experts, [experts, out, in] each): a token goes
                # through top_k of them; a router's [experts, hidden] weight scores every token.
                size = sum(p.numel() // experts * top_k if p.dim() == 3 else p.numel() for p in own)
                mixture = True
            else:
                skipped.append(name or type(module).__name__)
                continue
            if own[0].requires_grad:
                trained += size
            else:
                frozen += size
        if skipped:
            warnings.warn(f"stream_metrics: FLOPs leave out the weights of {len(skipped)} modules that are not "
                          f"linear layers (e.g. {skipped[0]!r}: convolutions, experts the config does not name); "
                          "pass flops_per_token= to init() or the callback for an exact figure", stacklevel=3)
        layers = getattr(config, "num_hidden_layers", None)
        heads = getattr(config, "num_attention_heads", None)
        head_dim = getattr(config, "head_dim", None)
        hidden = getattr(config, "hidden_size", None)
        if head_dim is None and heads and hidden:
            head_dim = hidden // heads
        # Every expert holds the same weights: top_k / experts of their sum is top_k experts' (a whole number).
        if experts:
            trained += routed_trained * top_k // experts
            frozen += routed_frozen * top_k // experts
        per_token = 6 * trained + 4 * frozen
        method = "model weights: 6 x trained + 4 x frozen matmul weights per token" + (
            f" (experts: {top_k} of {experts} per token)" if mixture else "")
        if not (isinstance(layers, int) and isinstance(heads, int) and isinstance(head_dim, int)):
            return cls(per_token, method=method + " (attention not counted: the config names no layers and heads)")
        kernel = str(getattr(config, "_attn_implementation", None) or "eager")
        varlen = any(k in kernel for k in _VARLEN_KERNELS)
        method += f" + attention 12 x {layers} layers x {heads * head_dim} x " + (
            "sum of example lengths squared" if varlen else "row length squared") + f" ({kernel})"
        return cls(per_token, 12 * layers * heads * head_dim, varlen, method)


# An expert's own module in a list of them (transformers 4's Mixtral, Qwen-MoE, DeepSeek: mlp.experts.3.w1).
_EXPERT = re.compile(r"(^|\.)experts\.\d+(\.|$)")


def _experts(config) -> tuple[int, int]:
    """(experts per layer, experts each token goes through) from a mixture-of-experts config, or (0, 0)."""
    top_k = getattr(config, "num_experts_per_tok", None)
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        experts = getattr(config, name, None)
        if isinstance(experts, int) and isinstance(top_k, int) and 0 < top_k <= experts:
            return experts, top_k
    return 0, 0


class FlopCount:
    """The FLOPs of this session's training micro-batches, on this rank, without a host sync.

    Two running totals, each a Python int plus an on-device sum (counting.Total): the tokens in
    the batches' shapes and the attention pairs. ``total`` turns every rank's totals into FLOPs.
    """

    def __init__(self, formula: FlopFormula):
        self.formula = formula
        self.tokens, self.pairs = Total(), Total()

    def add(self, batch, tokens: Count | None) -> None:
        """Account for one micro-batch (its padded shape; ``tokens`` where the batch has no ids)."""
        batch, lengths = _parts(batch)
        shape = _shape(batch)
        if shape is None:
            if tokens is not None:
                self.tokens.add(tokens)
            elif batch is None:  # update(samples=...) alone: nothing says how many tokens were trained on
                warn_once("flops-no-tokens", "update() had no batch and no tokens=, so its micro-batch adds no "
                                             "FLOPs: progress/flops leaves it out. Pass tokens= (or the batch) "
                                             "to update() to count them.")
            if lengths is not None and self.formula.per_pair:  # sequences of their own lengths, each alone
                self.pairs.add(sum(n * n for n in lengths))
            return
        rows, length = shape
        self.tokens.add(rows * length)
        if self.formula.per_pair:
            self.pairs.add(_varlen_pairs(batch, shape) if self.formula.varlen else rows * length * length, fresh=True)

    def snapshot(self) -> "FlopCount":
        """A copy taken without waiting for the device (Tally.mark)."""
        copy = FlopCount(self.formula)
        copy.tokens, copy.pairs = self.tokens.snapshot(), self.pairs.snapshot()
        return copy

    def local(self) -> FlopFields:
        """This rank's fields for the row's gather (host ints or 0-d device tensors)."""
        return {"flop_tokens": self.tokens.value(), "flop_pairs": self.pairs.value()}

    def totals(self) -> dict[str, Total]:
        """The same fields as ``local``, as the totals themselves (a one-process row reads them)."""
        return {"flop_tokens": self.tokens, "flop_pairs": self.pairs}

    def settle(self, mine: RankRecord) -> None:
        """This rank's fields as the gather read them: kept as host ints (counting.Total.settle)."""
        self.tokens.settle(mine["flop_tokens"])
        self.pairs.settle(mine["flop_pairs"])

    def total(self, ranks: list[RankRecord], weights: list[int] | None = None):
        """The FLOPs of every rank's gathered fields: an exact int where the formula is whole.

        ``weights``: 0 for a rank whose batch another rank already counts (layout.weights).
        """
        weights = [1] * len(ranks) if weights is None else weights
        tokens = sum(w * int(r["flop_tokens"]) for r, w in zip(ranks, weights))
        pairs = sum(w * int(r["flop_pairs"]) for r, w in zip(ranks, weights))
        return self.formula.of_tokens(tokens, pairs)


def _parts(batch) -> tuple[Any, list[int] | None]:
    """(where the token ids are, the lengths of unpadded sequences) of a batch, its tuple or list form
    read as counting.sequence_form reads it: the inputs dict of ``(inputs, targets)`` or the ids
    first in ``(ids, mask, labels)``; ragged sequences (1-D token tensors or token lists) and their
    lengths; anything else as it is, with no lengths."""
    if not isinstance(batch, (tuple, list)) or not batch:
        return batch, None
    form = sequence_form(batch)
    if form is None:
        return batch, None
    kind, held = form
    if kind == "ragged":
        return batch, held
    if kind == "part" and not isinstance(held, torch.Tensor):
        return held, None
    if kind == "part" and held.dim() >= 2 and not torch.is_floating_point(held):
        return {"input_ids": held}, None
    return batch, None


def _shape(batch) -> tuple[int, int] | None:
    """(rows, length) of the batch's token ids (or embeddings), read from the shape alone."""
    if hasattr(batch, "get"):
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            ids = batch.get("inputs_embeds")
            ids = ids[..., 0] if isinstance(ids, torch.Tensor) and ids.dim() >= 3 else None
    elif isinstance(batch, torch.Tensor) and not torch.is_floating_point(batch):
        ids = batch
    else:
        return None
    if not isinstance(ids, torch.Tensor) or ids.dim() == 0:
        return None
    return (ids.shape[0], ids.shape[1]) if ids.dim() >= 2 else (ids.shape[0], 1)


def _varlen_pairs(batch, shape: tuple[int, int]) -> Count:
    # The (query, key) pairs a variable-length kernel computes: sum of squared example lengths.
    rows, length = shape
    if not hasattr(batch, "get"):
        return rows * length * length
    cu = batch.get("cu_seq_lens_q")
    if isinstance(cu, torch.Tensor) and cu.dim() == 1 and cu.numel() > 1:
        lengths = cu[1:] - cu[:-1]
        return (lengths.long() * lengths.long()).sum()
    positions = batch.get("position_ids")
    positions = positions if isinstance(positions, torch.Tensor) and positions.numel() == rows * length else None
    mask = batch.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.numel() == rows * length and mask.dim() <= 2 else None
    if positions is not None:
        # An example of length n has positions 0..n-1, and the sum of 2p+1 over them is n**2.
        pairs = 2 * positions.long().reshape(rows, length) + 1
        return (pairs * (mask.reshape(rows, length) != 0) if mask is not None else pairs).sum()
    if mask is not None:
        lengths = (mask.reshape(rows, length) != 0).sum(-1)  # padded rows: the kernel drops the padding
        return (lengths * lengths).sum()
    return rows * length * length


# ---------------------------------------------------------------------------- peak FLOP/s

# Dense peak FLOP/s of one device by matrix precision. Data sheets quote tensor-core figures "with
# sparsity": the dense figure is half of that. Sources:
#   A100: nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf (SXM4 and PCIe alike)
#   H100, H100 NVL: nvidia.com/en-us/data-center/h100 datasheet (SXM and NVL columns); H100 PCIe:
#     the H100 PCIe product brief (1,513 TF bf16 with sparsity)
#   H200, H200 NVL: nvidia.com/en-us/data-center/h200 datasheet (same tensor cores as H100)
#   B200: HGX B200 datasheet, per GPU (4.5 PF fp16/bf16 with sparsity)
#   L4: nvidia-l4-datasheet (242 TF fp16/bf16, 120 TF tf32, with sparsity; 30.3 TF fp32)
#   A10 / A10G: a10-datasheet.pdf (AWS's A10G has no sheet of its own; Lightning's table uses the A10's)
#   V100: volta-v100-datasheet-update-us-1165301-r5.pdf (no bf16, no tf32)
#   MI300X: AMD Instinct MI300X data sheet (1,307.4 TF fp16/bf16 dense, 653.7 TF tf32, 163.4 TF fp32 matrix)
PEAK_FLOPS = {
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
    "H100 SXM": {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "fp16": 989.5e12},
    "H100 NVL": {"fp32": 60e12, "tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12},
    "H100 PCIe": {"fp32": 51e12, "tf32": 378e12, "bf16": 756.5e12, "fp16": 756.5e12},
    "H200": {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "fp16": 989.5e12},
    "H200 NVL": {"fp32": 60e12, "tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12},
    "B200": {"bf16": 2.25e15, "fp16": 2.25e15},
    "L4": {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12, "fp16": 121e12},
    "A10G": {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12},
    "V100 SXM2": {"fp32": 15.7e12, "fp16": 125e12},
    "V100 PCIe": {"fp32": 14e12, "fp16": 112e12},
    "V100S PCIe": {"fp32": 16.4e12, "fp16": 130e12},
    "MI300X": {"fp32": 163.4e12, "tf32": 653.7e12, "bf16": 1307.4e12, "fp16": 1307.4e12},
}
# The device name torch reports -> the table's entry; first match wins (variants before the plain name).
_DEVICE_NAMES = [
    (r"h100.*nvl", "H100 NVL"), (r"h100.*(pcie|hbm2e)", "H100 PCIe"), (r"h100.*(sxm|hbm3)", "H100 SXM"),
    (r"h200.*nvl", "H200 NVL"), (r"h200", "H200"), (r"\bb200\b", "B200"), (r"a100", "A100"),
    (r"\bl4\b", "L4"), (r"\ba10g?\b", "A10G"), (r"v100s", "V100S PCIe"), (r"v100.*sxm", "V100 SXM2"),
    (r"v100.*pcie", "V100 PCIe"), (r"mi300x", "MI300X"),
]
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}


@dataclass(frozen=True)
class Peak:
    """The peak FLOP/s of one device, and where the figure came from (the run's tag)."""

    flops: float
    source: str

    def __str__(self) -> str:
        return f"{self.flops:.4g} FLOP/s per device ({self.source})"


def device_peak(device: torch.device, precision: str) -> Peak | None:
    """The table's figure for ``device`` at ``precision`` (``"bf16"``...), or None where not known.

    >>> device_peak(torch.device("cpu"), "fp32") is None
    True
    """
    if device.type != "cuda":
        return None  # CPUs, MPS, XLA: no figure rather than a wrong one
    name = torch.cuda.get_device_name(device)
    peak = named_peak(name, precision)
    if peak is None:
        warn_once("peak-unknown", f"no peak FLOP/s is known for {name!r} at {precision}, so throughput/mfu is not "
                                  "logged; pass peak_flops= (FLOP/s of one device) to log it")
    return peak


def named_peak(device_name: str, precision: str) -> Peak | None:
    """The table's figure for a device name as torch reports it, or None.

    >>> named_peak("NVIDIA H100 80GB HBM3", "bf16").flops, named_peak("Tesla V100-SXM2-32GB", "bf16")
    (989500000000000.0, None)
    """
    entry = next((e for pattern, e in _DEVICE_NAMES if re.search(pattern, device_name.lower())), None)
    figure = PEAK_FLOPS.get(entry, {}).get(precision) if entry is not None else None
    return None if figure is None else Peak(figure, f"{entry} {precision}, data sheet; device {device_name!r}")


def precision_of(model: torch.nn.Module | None, precision: str | None = None) -> str:
    """The precision matrix products run at: given, else the model's weights' (fp32 as tf32 where torch allows)."""
    if precision is not None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not one of {', '.join(map(repr, PRECISIONS))}")
        return precision
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32) if model else \
        torch.float32
    names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    if dtype in names:
        return names[dtype]
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def trainer_precision(args) -> str | None:
    """The precision the Trainer's arguments set (``bf16=True`` runs matmuls in bf16 under autocast)."""
    if getattr(args, "bf16", False):
        return "bf16"
    if getattr(args, "fp16", False):
        return "fp16"
    return "tf32" if getattr(args, "tf32", None) else None


def check_peak_options(peak_flops, precision) -> None:
    """``peak_flops=`` and ``precision=`` as given: a clear error now, whether or not FLOPs are counted
    yet (the Trainer's callback counts them from the model it meets at train begin)."""
    if peak_flops is not None and (isinstance(peak_flops, bool) or not isinstance(peak_flops, (int, float)) or not (
            math.isfinite(peak_flops) and peak_flops > 0)):
        raise ValueError(f"peak_flops={peak_flops!r} must be the peak FLOP/s of one device, a number > 0 "
                         "(e.g. 989e12 for an H100 SXM in bf16)")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(map(repr, PRECISIONS))}")


def resolve_peak(peak_flops, model, precision: str | None) -> Peak | None:
    """``peak_flops`` given (a number), else the table's entry for the model's device and precision."""
    check_peak_options(peak_flops, precision)
    if peak_flops is not None:
        return Peak(float(peak_flops), "given as peak_flops")
    precision = precision_of(model, precision)
    if model is not None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
    return device_peak(device, precision)


def formula_for(model, flops_per_token) -> FlopFormula | None:
    """The FLOPs formula a Run uses: ``flops_per_token`` given, else the model's; None: not counted."""
    if flops_per_token is not None:
        if isinstance(flops_per_token, bool) or not isinstance(flops_per_token, (int, float)) or not (
                math.isfinite(flops_per_token) and flops_per_token > 0):
            raise ValueError(f"flops_per_token={flops_per_token!r} must be a number > 0: the training FLOPs "
                             "(forward and backward) of one token, e.g. 6 x the parameter count")
        whole = isinstance(flops_per_token, int) or float(flops_per_token).is_integer()
        return FlopFormula(int(flops_per_token) if whole else flops_per_token,
                           method="given: flops_per_token x tokens in each batch's shape")
    if model is None:
        return None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model= must be a torch.nn.Module (the model being trained), not {type(model).__name__}")
    return FlopFormula.of_model(model)


def throughput(progress, last, elapsed: float, tokens_per_s: float | None, peak: Peak | None,
               devices: int | None = None) -> dict:
    """The FLOP rate and per-device keys of a row (schema section 1), since the ``last`` row: a few float ops."""
    row = {}
    devices = distributed.world_size() if devices is None else devices  # layout.Layout.distinct_devices
    if tokens_per_s is not None:
        row[schema.TOKENS_PER_S_PER_DEVICE] = tokens_per_s / devices
    if progress.flops is None or elapsed <= 0:
        return row
    flops_per_s = float(progress.flops - (last.flops or 0)) / elapsed
    row[schema.FLOPS_PER_S] = flops_per_s
    if peak is not None:
        # Every device shares the job's FLOPs (tensor-parallel ranks split a batch's), so MFU divides by all.
        mfu = flops_per_s / (devices * peak.flops)
        if mfu <= 1:
            row[schema.MFU] = mfu
        else:
            warn_once("mfu-above-1", f"the FLOP rate is above the peak ({peak}), so throughput/mfu is not logged: "
                                     "pass peak_flops= with the peak FLOP/s of one device")
    return row
