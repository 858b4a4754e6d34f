"""The performance model behind `tetra plan`: valid grids, communication where it belongs, memory, and the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tetra.cli import main
from tetra.errors import ConfigError
from tetra.model.presets import preset_config
from tetra.parallel.grid import GridShape
from tetra.parallel.planner import MachineProfile, group_bandwidth, model_gemms, plan, predict, valid_grids

LLAMA_8B = preset_config("llama-8b")


@pytest.mark.parametrize("name", ["perlmutter", "frontier", "alps", "dgx-h100"])
def test_shipped_profiles_load(name):
    machine = MachineProfile.load(name)
    assert machine.gemm_flops < machine.peak_flops and machine.inter_node_bandwidth < machine.intra_node_bandwidth


def test_every_grid_is_valid_and_each_dimension_only_costs_when_used():
    machine = MachineProfile.load("dgx-h100")
    grids = valid_grids(LLAMA_8B, 16, global_batch=64)
    assert grids and all(g.world == 16 for g in grids)
    assert GridShape(data=16) in grids and GridShape(row=8, col=2) in grids
    data_only = predict(LLAMA_8B, GridShape(data=16), 64, 2048, machine)
    assert data_only.collectives["col"] == data_only.collectives["row"] == data_only.collectives["depth"] == 0
    assert data_only.collectives["data"] > 0
    tensor = predict(LLAMA_8B, GridShape(row=2, col=8), 64, 2048, machine)
    assert tensor.collectives["data"] == 0 and tensor.collectives["col"] > 0 and tensor.collectives["row"] > 0


def test_elementwise_work_and_fixed_costs_are_counted_per_rank():
    machine = dataclasses.replace(MachineProfile.load("dgx-h100"), layer_overhead=1e-3, step_overhead=5e-3)
    config = preset_config("llama-1b")
    data = predict(config, GridShape(data=8), 64, 2048, machine)
    # 8 micro-steps of one sequence per rank, each running every layer once, plus the step's own fixed cost
    assert data.overhead == pytest.approx(8 * config.n_layers * 1e-3 + 5e-3)
    # Depth 8 streams the same activations per rank but updates an eighth of the parameters; so does ZeRO-1.
    depth = predict(config, GridShape(depth=8), 64, 2048, machine)
    zero1 = predict(config, GridShape(data=8), 64, 2048, machine, zero1=True)
    optimizer = 36 * config.num_parameters() * (1 - 1 / 8) / machine.memory_bandwidth
    assert data.elementwise - depth.elementwise == pytest.approx(optimizer)
    assert data.elementwise - zero1.elementwise == pytest.approx(optimizer)
    # Splitting the hidden state and the MLP over columns and rows splits their elementwise work too.
    tensor = predict(config, GridShape(row=2, col=4), 64, 2048, machine)
    assert tensor.elementwise < predict(config, GridShape(), 64, 2048, machine).elementwise / 2
    assert data.step_time == pytest.approx(data.compute + data.elementwise + data.overhead
                                           + sum(data.exposed(k) for k in data.collectives))
    unknown = dataclasses.replace(machine, memory_bandwidth=0.0)
    assert predict(config, GridShape(data=8), 64, 2048, unknown).elementwise == 0.0


def test_groups_that_leave_the_node_use_the_slower_links():
    # Without the fixed per-call cost, a group's time is its bytes over its links' bandwidth.
    machine = dataclasses.replace(MachineProfile.load("perlmutter"), collective_latency=0.0)  # 4 devices per node
    assert group_bandwidth(machine, GridShape(row=2, col=4), "col") == machine.intra_node_bandwidth
    assert group_bandwidth(machine, GridShape(row=2, col=4), "row") == machine.inter_node_bandwidth
    shape = GridShape(row=2, col=4)
    across = predict(LLAMA_8B, shape, 64, 2048, machine)
    inside = predict(LLAMA_8B, shape, 64, 2048, dataclasses.replace(machine, devices_per_node=8))
    assert inside.collectives["col"] == pytest.approx(across.collectives["col"])  # the column group fits either way
    ratio = machine.intra_node_bandwidth / machine.inter_node_bandwidth
    assert across.collectives["row"] == pytest.approx(inside.collectives["row"] * ratio)


def test_memory_shrinks_with_sharding_and_is_checked_against_the_device():
    machine = MachineProfile.load("dgx-h100")
    alone = predict(LLAMA_8B, GridShape(data=8), 64, 2048, machine)
    sharded = predict(LLAMA_8B, GridShape(depth=8), 64, 2048, machine)
    zero = predict(LLAMA_8B, GridShape(data=8), 64, 2048, machine, zero1=True)
    assert not alone.fits  # 8B parameters x 16 bytes of weights, gradients and AdamW state on one 80 GB GPU
    assert sharded.fits and sharded.memory["parameters"] == pytest.approx(alone.memory["parameters"] / 8)
    assert zero.memory["optimizer"] == pytest.approx(alone.memory["optimizer"] / 8)
    ranked = plan(LLAMA_8B, 8, 64, 2048, machine)
    assert ranked[0].fits and all(a.step_time <= b.step_time for a, b in zip(ranked, ranked[1:], strict=False)
                                  if a.fits == b.fits)


def test_every_collective_call_pays_the_latency():
    machine = MachineProfile.load("dgx-h100")
    free = dataclasses.replace(machine, collective_latency=0.0)
    shape, layers = GridShape(row=2, col=2, data=2), LLAMA_8B.n_layers
    slow, fast = predict(LLAMA_8B, shape, 64, 2048, machine, overlap=False), \
        predict(LLAMA_8B, shape, 64, 2048, free, overlap=False)
    micro_steps = 64 // 2
    # col, per layer: the output sums of q, k, v, gate and up (normal layers), the input-gradient sums of o and
    # down (transposed), the two norms' statistics forward and backward; then the head's output sum and the final
    # norm.
    col_calls = micro_steps * ((5 + 2 + 4) * layers + 1 + 2)
    assert slow.collectives["col"] - fast.collectives["col"] == pytest.approx(col_calls * machine.collective_latency)
    assert slow.collectives["depth"] == fast.collectives["depth"] == 0  # no depth group, no calls


def test_latency_follows_the_measured_group_size(tmp_path):
    flat = dataclasses.replace(MachineProfile.load("dgx-h100"), collective_latency=1.0)
    measured = dataclasses.replace(flat, collective_latency_by_group=((2, 1e-4), (4, 6e-4)))
    assert flat.latency(8) == 1.0  # nothing measured: one figure for every group
    assert measured.latency(2) == 1e-4 and measured.latency(4) == 6e-4
    assert measured.latency(8) == pytest.approx(6e-4 * 7 / 3)  # beyond the largest measured: a ring's (g - 1)

    def collectives(machine: MachineProfile, shape: GridShape) -> dict[str, float]:
        return predict(LLAMA_8B, shape, 64, 2048, machine, overlap=False).collectives

    no_latency = dataclasses.replace(flat, collective_latency=0.0)
    for shape in (GridShape(row=2, col=2, data=2), GridShape(row=4, col=2), GridShape(depth=2, col=4)):
        base, counted, charged = (collectives(m, shape) for m in (no_latency, flat, measured))
        for dimension in ("col", "row", "depth", "data"):
            calls = counted[dimension] - base[dimension]  # at 1 s per call: the number of calls
            size = getattr(shape, dimension)
            expected = calls * measured.latency(size) if size > 1 else 0.0
            assert charged[dimension] - base[dimension] == pytest.approx(expected)
    keys = {"name": '"node"', "devices_per_node": 4, "memory_gb": 16.0, "peak_flops": 1e12, "gemm_flops": 5e11,
            "intra_node_bandwidth": 1e9, "inter_node_bandwidth": 1e9}
    profile = tmp_path / "node.toml"
    text = "".join(f"{key} = {value}\n" for key, value in keys.items())
    profile.write_text(text + "collective_latency_by_group = [[2, 1e-4], [4, 6e-4]]\n")
    assert MachineProfile.load(str(profile)).latency(4) == 6e-4
    profile.write_text(text + "collective_latency_by_group = [2, 4]\n")
    with pytest.raises(ConfigError, match=r"list of \[ranks, seconds\] pairs"):
        MachineProfile.load(str(profile))


def test_overlap_hides_only_the_background_collectives_up_to_their_compute_window():
    machine = MachineProfile.load("perlmutter")
    shape = GridShape(data=8, depth=2, row=4)
    overlapped = predict(LLAMA_8B, shape, 512, 4096, machine)
    blocking = predict(LLAMA_8B, shape, 512, 4096, machine, overlap=False)
    assert overlapped.collectives == blocking.collectives and overlapped.compute == blocking.compute
    assert blocking.step_time == pytest.approx(blocking.compute + blocking.elementwise + blocking.overhead
                                               + sum(blocking.collectives.values()))
    assert overlapped.step_time < blocking.step_time
    for name in ("col", "row", "depth", "data"):
        hidden = overlapped.collectives[name] - overlapped.exposed(name)
        assert 0 <= hidden <= min(overlapped.windows[name], overlapped.overlappable[name]) + 1e-12
    # The output all-reduce of a layer is needed by the next operation: a row-only grid's forward sums stay exposed.
    row_only = predict(LLAMA_8B, GridShape(row=8), 64, 2048, machine)
    assert row_only.exposed("row") > 0
    # A machine that hides only half of what overlaps (measured by `tetra calibrate`) exposes the other half.
    half = predict(LLAMA_8B, shape, 512, 4096, dataclasses.replace(machine, overlap_efficiency=0.5))
    for name in ("col", "row", "depth", "data"):
        hidden = overlapped.collectives[name] - overlapped.exposed(name)
        assert half.collectives[name] - half.exposed(name) == pytest.approx(hidden / 2)


def test_plan_command(capsys):
    assert main(["plan", "--model", "llama-1b", "--devices", "8", "--machine", "dgx-h100", "--global-batch", "64",
                 "--seq", "2048", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["machine"] == "dgx-h100" and len(result["grids"]) > 5
    assert {"grid", "step_s", "compute_s", "collectives_s", "exposed_collectives_s", "memory_gb",
            "fits"} <= set(result["grids"][0])
    assert main(["plan", "--model", "llama-1b", "--devices", "8", "--machine", "dgx-h100", "--global-batch", "64",
                 "--seq", "2048", "--no-overlap"]) == 0
    assert "(blocking collectives)" in capsys.readouterr().out
    assert main(["plan", "--model", "tiny", "--devices", "4", "--machine", "nowhere", "--global-batch", "8",
                 "--seq", "64"]) == 2
    assert "No machine profile 'nowhere'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="No grid of 7 devices"):
        plan(preset_config("tiny"), 7, 8, 64, MachineProfile.load("alps"))


def test_calibrate_writes_a_profile_that_plan_reads(tmp_path, capsys):
    profile = tmp_path / "node.toml"
    assert main(["calibrate", "--processes", "2", "--out", str(profile), "--device", "cpu"]) == 0
    machine = MachineProfile.load(str(profile))
    assert machine.devices_per_node == 2 and machine.gemm_flops > 1e9 and machine.intra_node_bandwidth > 1e6
    assert 0.0 <= machine.overlap_efficiency <= 1.0 and "overlap_efficiency" in profile.read_text()
    assert machine.memory_bandwidth > 1e8 and machine.layer_overhead > 0 and machine.step_overhead > 0
    assert [size for size, _ in machine.collective_latency_by_group] == [2]
    assert 0 < machine.latency(2) < 1.0 and machine.latency(2) == machine.collective_latency
    capsys.readouterr()
    assert main(["plan", "--model", "tiny", "--devices", "2", "--machine", str(profile), "--global-batch", "4",
                 "--seq", "64", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["grids"]) >= 3


def test_auto_grid_keeps_the_global_batch_and_takes_the_best_plan():
    from tetra.config import build_run_config
    from tetra.train.setup import auto_grid

    config = build_run_config({"data": {"path": "x", "seq_len": 2048}, "train": {"batch_size": 4, "warmup_steps": 1},
                               "parallel": {"auto": True, "machine": "dgx-h100"}})
    chosen, summary = auto_grid(config, LLAMA_8B, world=8)
    p = chosen.parallel
    assert p.data * p.depth * p.row * p.col == 8
    assert chosen.train.batch_size * p.data * p.depth == 4 * 8
    best = plan(LLAMA_8B, 8, 32, 2048, MachineProfile.load("dgx-h100"), micro_batch=1)[0].shape
    assert (p.data, p.depth, p.row, p.col) == (best.data, best.depth, best.row, best.col)
    assert "parallel.auto on 8 x dgx-h100" in summary
    with pytest.raises(ConfigError, match="parallel.auto needs parallel.machine"):
        build_run_config({"data": {"path": "x"}, "train": {"warmup_steps": 1}, "parallel": {"auto": True}})


def test_gathering_again_in_backward_trades_one_all_gather_for_the_blocks_memory():
    machine = dataclasses.replace(MachineProfile.load("perlmutter"), collective_latency=0.0)
    shape = GridShape(depth=4, row=2, col=2)
    regather = predict(LLAMA_8B, shape, 64, 2048, machine, overlap=False, regather=True)
    keep = predict(LLAMA_8B, shape, 64, 2048, machine, overlap=False)
    # Depth traffic per Linear block: two fp32 gathers and an fp32 reduce-scatter (1.5x one gather and the scatter);
    # the embedding table is gathered once either way (its backward does not need it).
    table = LLAMA_8B.vocab_size * LLAMA_8B.hidden_size
    linear = sum(gemm.in_features * gemm.out_features * gemm.per_model for gemm in model_gemms(LLAMA_8B))
    expected = (1.5 * linear + table) / (linear + table)
    assert regather.collectives["depth"] / keep.collectives["depth"] == pytest.approx(expected, rel=1e-6)
    # Kept: every Linear's bf16 block over row x col = 4 stays for backward; gathered again: two blocks at most.
    assert keep.memory["gathered_weights"] == pytest.approx(linear / 4 * 2, rel=1e-6)
    assert regather.memory["gathered_weights"] < keep.memory["gathered_weights"] / 3
    assert predict(LLAMA_8B, GridShape(row=2, col=2), 64, 2048, machine).memory["gathered_weights"] == 0


def test_recomputation_trades_activation_memory_for_one_more_forward():
    machine = dataclasses.replace(MachineProfile.load("perlmutter"), collective_latency=0.0)
    shape = GridShape(row=2, col=2)
    runs = {part: predict(LLAMA_8B, shape, 64, 2048, machine, overlap=False, recompute=part)
            for part in ("none", "attention", "mlp", "block")}
    memory = {part: run.memory["activations"] for part, run in runs.items()}
    assert memory["block"] < memory["mlp"] < memory["attention"] < memory["none"]  # the MLP keeps more (16/t)
    micro, tokens, hidden, layers = 2048, 64 * 2048, LLAMA_8B.hidden_size, LLAMA_8B.n_layers  # one sequence a step
    logits = micro * LLAMA_8B.vocab_size / shape.row * 4
    # whole blocks: each layer keeps its input (2 bytes per value); one layer at a time holds all of 10 + 24/4
    assert memory["block"] - logits == pytest.approx(micro * hidden * (2 * layers + 16), rel=1e-9)
    assert memory["none"] - logits == pytest.approx(micro * hidden * 16 * layers, rel=1e-9)
    # one more forward of what is recomputed: a third of its GEMM time, and its output sums once more
    gemm = {gemm.name: gemm for gemm in model_gemms(LLAMA_8B)}
    assert runs["mlp"].compute > runs["none"].compute and runs["block"].compute > runs["attention"].compute
    layer_gemms = sum(6 * tokens * g.in_features * g.out_features * g.per_model / 4 / machine.gemm_flops
                      for name, g in gemm.items() if name != "head")
    attention_core = layers * 4 * tokens * 2048 * LLAMA_8B.n_heads * LLAMA_8B.resolved_head_dim / 2 / machine.gemm_flops
    assert runs["block"].compute - runs["none"].compute == pytest.approx(layer_gemms / 3 + attention_core, rel=1e-6)
    assert runs["block"].collectives["col"] > runs["none"].collectives["col"]
    assert main(["plan", "--model", "llama-8b", "--devices", "8", "--machine", "perlmutter", "--global-batch",
                 "64", "--seq", "2048", "--recompute", "mlp"]) == 0


def test_lora_fine_tuning_holds_a_frozen_bf16_base_and_reduces_no_weight_gradients():
    machine = dataclasses.replace(MachineProfile.load("perlmutter"), collective_latency=0.0)
    shape = GridShape(data=2, depth=2, row=2)
    full = predict(LLAMA_8B, shape, 64, 2048, machine, overlap=False)
    lora = predict(LLAMA_8B, shape, 64, 2048, machine, overlap=False, finetune="lora")
    assert lora.memory["parameters"] == full.memory["parameters"] / 2
    assert lora.memory["gradients"] == lora.memory["optimizer"] == 0 < full.memory["optimizer"]
    assert lora.memory["activations"] == full.memory["activations"]
    assert lora.collectives["data"] == 0 < full.collectives["data"]
    assert lora.collectives["depth"] < full.collectives["depth"] / 2  # bf16 gathers, no reduce-scatter
    assert lora.collectives["row"] == full.collectives["row"]  # activations move the same
    linear = sum(6 * 16 * 2048 * g.in_features * g.out_features * g.per_model / 2 / machine.gemm_flops
                 for g in model_gemms(LLAMA_8B))  # 16 sequences per batch rank, blocks split over 2 rows
    assert full.compute - lora.compute == pytest.approx(linear / 3, rel=1e-6)  # no weight-gradient GEMMs
    assert main(["plan", "--model", "llama-8b", "--devices", "8", "--machine", "dgx-h100", "--global-batch", "64",
                 "--seq", "4096", "--finetune", "lora", "--top", "1"]) == 0
