"""Compute as an axis: progress/flops against torch's own FLOP counter, MFU, resume, ranks, compare.

The ground truth is ``torch.utils.flop_counter.FlopCounterMode`` wrapped around the real training
(it counts every matrix product torch runs), and what MLflow and W&B stored is read back from
their stores. The tiny models use eager attention: FlopCounterMode sees its matrix products, while
the CPU kernel of SDPA is not one it knows.
"""
from __future__ import annotations

import csv
import glob
import os

import pytest
import torch
from mlflow import MlflowClient
from torch.utils.flop_counter import FlopCounterMode

import tiny
from streaming_trainer import build_trainer

import stream_metrics
from stream_metrics import schema
from stream_metrics.flops import FlopCount, FlopFormula, named_peak
from stream_metrics.hf import StreamMetricsCallback

PEAK = 1e12  # FLOP/s of one "device": given, since a CPU has no table entry


def the_run(uri, experiment="Default"):
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def stored(client, run_id, key) -> list[float]:
    """A key's values as MLflow stored them, in logging order."""
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))]


def eager(model):
    model.set_attn_implementation("eager")
    return model


# ---------------------------------------------------------------------------- the formula, in isolation

def test_the_formula_equals_flop_counter_mode_for_trained_and_frozen_weights():
    model = eager(tiny.tiny_model())
    for p in [*model.model.layers[0].mlp.parameters(), *model.lm_head.parameters()]:
        p.requires_grad_(False)  # frozen, as LoRA's base weights: no weight gradient, 4 FLOPs per weight
    model.train()
    ids = torch.randint(2, 250, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0  # padding is computed all the same
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    with stream_metrics.init(backend="none", model=model) as run:
        run.update({"input_ids": ids, "attention_mask": mask})
        assert run.progress.flops == counter.get_total_flops()


class ListedExperts(torch.nn.Module):
    """A mixture of experts held one module each, as transformers 4 held Mixtral's (mlp.experts.N):
    each token goes through the top 2 of 4 experts its router scores highest."""

    def __init__(self, hidden=16, experts=4, top_k=2):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(num_local_experts=experts, num_experts_per_tok=top_k)
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(experts))
        self.head = torch.nn.Linear(hidden, 8, bias=False)
        self.top_k = top_k

    def forward(self, x):
        weights, chosen = self.router(x).softmax(-1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            out = out.index_add(0, rows, expert(x[rows]) * weights[rows, slot, None])
        return self.head(out)


def test_mixture_of_experts_counts_the_experts_each_token_goes_through():
    """transformers' fused experts ([experts, out, in] weights, a tiny Mixtral run with its eager experts,
    which FlopCounterMode sees) and experts held one module each: top_k of them per token, not all or none."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    mixtral = MixtralForCausalLM(MixtralConfig(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128))
    if not hasattr(mixtral, "set_experts_implementation"):
        pytest.skip("this transformers holds Mixtral's experts as modules of their own (the second case)")
    eager(mixtral).set_experts_implementation("eager")
    mixtral.train()
    ids = torch.randint(2, 250, (3, 40))
    with FlopCounterMode(display=False) as counter:
        mixtral(input_ids=ids, labels=ids).loss.backward()
    with stream_metrics.init(backend="none", model=mixtral) as run:
        run.update({"input_ids": ids})
        assert run.progress.flops == counter.get_total_flops()

    listed, x = ListedExperts(), torch.randn(30, 16, requires_grad=True)  # as a lower layer's output
    with FlopCounterMode(display=False) as counter:
        listed(x).sum().backward()
    run = stream_metrics.init(backend="none", model=listed)
    assert run.flop_formula.of_tokens(30) == counter.get_total_flops()
    assert "(experts: 2 of 4 per token)" in run.flop_formula.method
    run.finish()


def test_tuple_list_and_ragged_batches_count_what_flop_counter_mode_counts():
    """A DataLoader over a TensorDataset yields [ids, labels]; (inputs, targets) tuples; unpadded sequences."""
    model = eager(tiny.tiny_model())
    model.train()
    ids = torch.randint(2, 250, (3, 40))

    def measured(*sequences):
        total = 0
        for seq in sequences:
            with FlopCounterMode(display=False) as counter:
                model(input_ids=seq, labels=seq).loss.backward()
            total += counter.get_total_flops()
        return total

    padded = measured(ids)
    ragged = [ids[0, :10], ids[1, :7], ids[2, :4]]
    cases = [([ids, ids], padded), ((ids, ids), padded), (({"input_ids": ids}, ids), padded),
             (ragged, measured(*(seq[None] for seq in ragged))),
             ([seq.tolist() for seq in ragged], measured(*(seq[None] for seq in ragged)))]
    for batch, truth in cases:
        with stream_metrics.init(backend="none", model=model) as run:
            run.update(batch)
            assert run.progress.flops == truth, type(batch[0])


def test_variable_length_attention_counts_squared_example_lengths_without_a_sync():
    from support import SyncCounter
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    lengths = [4, 3, 2]
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=16)
    packed = collate([{"input_ids": list(range(2, 2 + n))} for n in lengths])
    # The kernel attends within each example, and the 7 pad tokens (positions 0) each to itself.
    truth = sum(n * n for n in lengths) + 7
    padded_ids = torch.ones((3, 6), dtype=torch.long)
    padded_mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    cases = [
        (packed, truth),                                                                     # cu_seq_lens_q
        ({k: v for k, v in packed.items() if not k.startswith("cu_seq_lens")}, truth),       # position_ids restarts
        ({"input_ids": padded_ids, "attention_mask": padded_mask}, sum(n * n for n in lengths)),  # padded rows
    ]
    for batch, expected in cases:
        count = FlopCount(FlopFormula(per_token=0, per_pair=1, varlen=True))
        watched = {k: v.as_subclass(SyncCounter) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        SyncCounter.syncs = 0
        for _ in range(5):
            count.add(watched, None)
        assert SyncCounter.syncs == 0, "counting FLOPs made the host wait for the device"
        assert count.total([count.local()]) == 5 * expected


def test_the_peak_table_knows_common_devices_and_says_none_for_the_rest():
    assert named_peak("NVIDIA H100 80GB HBM3", "bf16").flops == 989.5e12
    assert named_peak("NVIDIA A100-SXM4-40GB", "tf32").flops == 156e12
    assert named_peak("AMD Instinct MI300X", "bf16").flops == 1307.4e12
    assert named_peak("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 on Volta: none rather than a wrong one
    assert named_peak("NVIDIA GeForce RTX 4090", "bf16") is None
    assert named_peak("NVIDIA L40S", "bf16") is None  # not the L4


def test_bad_flops_options_get_clear_errors():
    with pytest.raises(ValueError, match="x_axis='flops' needs FLOPs counted"):
        stream_metrics.init(backend="mlflow", x_axis="flops")
    with pytest.raises(ValueError, match="flops_per_token"):
        stream_metrics.init(backend="none", flops_per_token=-5)
    with pytest.raises(ValueError, match="peak_flops"):
        stream_metrics.init(backend="none", flops_per_token=100, peak_flops=0)
    with pytest.raises(ValueError, match="mlflow_step"):
        stream_metrics.init(backend="none", mlflow_step="flops")  # not an int64 axis
    # Checked when the callback is built, not when train() meets the model (or never, without one).
    with pytest.raises(ValueError, match="precision='bf17' is not one of"):
        StreamMetricsCallback(backend="none", precision="bf17")
    with pytest.raises(ValueError, match="peak_flops=-1 must be"):
        StreamMetricsCallback(backend="none", peak_flops=-1)
    with pytest.raises(ValueError, match="peak_flops='989e12' must be"):
        stream_metrics.init(backend="none", peak_flops="989e12")


def test_a_micro_batch_with_no_tokens_says_it_adds_no_flops(recwarn):
    run = stream_metrics.init(backend="none", x_axis="flops", flops_per_token=6)
    run.update(samples=4, tokens=10)
    run.update(samples=4)  # nothing says what it trained on: left out of the FLOPs, with one warning
    run.update(samples=4)
    assert run.log({})["progress/flops"] == 60
    said = [str(w.message) for w in recwarn if "adds no FLOPs" in str(w.message)]
    assert len(said) == 1 and "pass tokens=" in said[0].lower()
    run.finish()


# ---------------------------------------------------------------------------- real Trainer runs

@pytest.mark.slow
def test_a_trainer_on_a_padded_stream_stores_the_flops_torch_counts(workdir, corpus):
    uri = f"sqlite:///{workdir}/mlflow.db"
    callback = StreamMetricsCallback(backend=["mlflow"], mlflow={"tracking_uri": uri}, peak_flops=PEAK)
    trainer, _ = build_trainer(str(workdir / "out"), max_steps=7, batch_size=8, grad_accum=2, callbacks=[callback],
                               data=corpus["paths"], logging_steps=2)
    eager(trainer.model)
    with FlopCounterMode(display=False) as counter:
        trainer.train()
    client, run = the_run(uri)
    flops = stored(client, run.info.run_id, schema.FLOPS)
    # Within 15% is the promise; for this model (every matrix product a Linear or attention) it is exact.
    assert flops == sorted(flops) and flops[-1] == pytest.approx(counter.get_total_flops(), rel=1e-12)
    # MFU: in (0, 1], and the FLOP rate over (devices x the given peak), row by row.
    rates, mfus = stored(client, run.info.run_id, schema.FLOPS_PER_S), stored(client, run.info.run_id, schema.MFU)
    assert len(mfus) == len(rates) > 0 and all(0 < m <= 1 for m in mfus)
    assert mfus == pytest.approx([r / (1 * PEAK) for r in rates], rel=1e-9)
    assert stored(client, run.info.run_id, schema.TOKENS_PER_S_PER_DEVICE) == pytest.approx(
        stored(client, run.info.run_id, schema.TOKENS_PER_S), rel=1e-12)  # one process: one device
    assert run.data.tags["stream_metrics.flops_method"].startswith("model weights: 6 x trained")
    assert run.data.tags["stream_metrics.peak_flops"].endswith("(given as peak_flops)")


@pytest.mark.slow
def test_a_packed_trl_run_stores_the_flops_torch_counts(workdir, corpus):
    pytest.importorskip("trl")
    from trl_sft import build_sft_trainer

    uri = f"sqlite:///{workdir}/mlflow.db"
    callback = StreamMetricsCallback(backend=["mlflow"], mlflow={"tracking_uri": uri})
    # TRL turns activation checkpointing on by default: its recomputed forwards are hardware FLOPs, not
    # model FLOPs (what MFU counts), so torch's counter is compared on a run without it.
    trainer = build_sft_trainer(corpus["paths"], str(workdir / "out"), packing=True, max_steps=3,
                                callbacks=[callback], gradient_checkpointing=False)
    eager(trainer.model)
    with FlopCounterMode(display=False) as counter:
        trainer.train()
    client, run = the_run(uri)
    assert stored(client, run.info.run_id, schema.FLOPS)[-1] == pytest.approx(counter.get_total_flops(), rel=0.15)
    assert schema.MFU not in run.data.metrics  # a CPU: no peak known, so no MFU rather than a wrong one
    assert run.data.tags["stream_metrics.peak_flops"].startswith("unknown")


@pytest.mark.slow
def test_a_resumed_trainer_continues_its_flops_exactly(workdir, corpus):
    uri = f"sqlite:///{workdir}/mlflow.db"
    out = workdir / "out"

    def trainer(steps):
        callback = StreamMetricsCallback(backend=["mlflow"], mlflow={"tracking_uri": uri}, x_axis="flops")
        t, _ = build_trainer(str(out), max_steps=steps, batch_size=8, grad_accum=2, callbacks=[callback],
                             data=corpus["paths"], save_steps=4, logging_steps=2)
        return t

    trainer(8).train()  # uninterrupted, with a checkpoint at step 4
    client, run = the_run(uri)
    uninterrupted = stored(client, run.info.run_id, schema.FLOPS)
    trainer(8).train(resume_from_checkpoint=str(out / "checkpoint-4"))
    client, run = the_run(uri)  # the same MLflow run goes on
    resumed = stored(client, run.info.run_id, schema.FLOPS)[len(uninterrupted):]
    assert resumed[0] > uninterrupted[1] and resumed[-1] == uninterrupted[-1]  # exactly, not approximately
    assert run.data.tags["stream_metrics.x_axis"] == schema.FLOPS


# ---------------------------------------------------------------------------- compare, and two ranks

@pytest.mark.slow
def test_compare_puts_mlflow_and_wandb_runs_on_the_flops_axis(workdir, corpus):
    from compute_axis import train

    from stream_metrics import compare as sm_compare
    from stream_metrics.cli import main

    uri = f"sqlite:///{workdir}/mlflow.db"
    totals = {name: train(name, corpus["texts"], steps=6, uri=uri).progress.flops for name in ("small", "wide")}
    assert totals["wide"] > 2 * totals["small"]  # same data, a wider model: more compute
    at = f"{totals['small'] / 2:.3e}"
    assert main(["compare", "small", "wide", "--mlflow-uri", uri, "--axis", "flops", "--at", at,
                 "--out", "mlflow-out", "--no-png"]) == 0
    assert main(["compare", str(workdir / "wandb"), "--axis", "flops", "--at", at, "--out", "wandb-out",
                 "--no-png"]) == 0
    for out, backend in (("mlflow-out", "mlflow"), ("wandb-out", "wandb")):
        with open(os.path.join(out, "table.csv"), newline="") as f:
            table = list(csv.DictReader(f))
        assert {row["axis"] for row in table} == {schema.FLOPS}
        assert {(row["run"].split(" ")[0], row["backend"]) for row in table if float(row["amount"]) == float(at)} \
            == {("small", backend), ("wide", backend)}
    # W&B keys every chart by progress/flops: the run's x-axis, read from its transaction log.
    [small] = [r for r in sm_compare.read_runs([str(workdir / "wandb")]) if r.name == "small"]
    assert small.tags["x_axis"] == schema.FLOPS and small.rows[-1][schema.FLOPS] == float(totals["small"])
    [log] = glob.glob(str(workdir / "wandb" / "**" / "*.wandb"), recursive=True)[:1]
    defined = {(r.metric.name or r.metric.glob_name): r.metric.step_metric
               for r in sm_compare.wandb_records(log) if r.WhichOneof("record_type") == "metric"}
    assert defined[schema.FLOPS] == "" and defined["*"] == defined[schema.SAMPLES] == schema.FLOPS


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_sum_their_flops(workdir, mlflow_uri):
    from test_distributed import mlflow_run_ids, torchrun, uneven_corpus

    paths, _, _ = uneven_corpus(workdir)
    reports = torchrun("flops", "--mlflow-uri", mlflow_uri, *paths)
    measured = [r["measured_flops"] for r in reports]
    assert measured[0] != measured[1] > 0  # uneven shares
    [run_id] = mlflow_run_ids(mlflow_uri)
    flops = stored(MlflowClient(mlflow_uri), run_id, schema.FLOPS)
    assert flops[-1] == sum(measured)  # exact: every matrix product of this model is in the formula
    assert reports[0]["flops"] == reports[1]["flops"] == flops[-1]  # every rank holds the job's total
