"""GEMM layouts: both storage layouts compute a Linear's forward and gradients exactly; the choice follows the
timings with a margin, is cached per device, dtype, shape and token count, and survives a broken cache file."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tetra.parallel.gemm_layout import (
    GEMM_LAYOUTS,
    IN_OUT,
    OUT_IN,
    LayoutCache,
    choose_layouts,
    forward_gemm,
    input_grad_gemm,
    pick,
    stored_shape,
    time_layouts,
    weight_grad_gemm,
)
from tetra.parallel.grid import GridShape, ProcessGrid
from tetra.parallel.layout import Layout, gather_block, shard

CPU = torch.device("cpu")


@pytest.mark.parametrize("layout", GEMM_LAYOUTS)
def test_both_layouts_compute_the_linear_and_its_gradients(layout):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 7, generator=generator, dtype=torch.float64, requires_grad=True)  # [out, in]
    grad_y = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)
    F.linear(x, weight).backward(grad_y)
    stored = weight.detach() if layout == OUT_IN else weight.detach().t().contiguous()
    assert stored.shape == stored_shape((4, 7), layout)
    torch.testing.assert_close(forward_gemm(x.detach(), stored, layout), F.linear(x, weight).detach())
    torch.testing.assert_close(input_grad_gemm(grad_y, stored, layout), x.grad)
    grad_stored = weight_grad_gemm(grad_y, x.detach(), layout)
    torch.testing.assert_close(grad_stored if layout == OUT_IN else grad_stored.t(), weight.grad)


def test_transposed_layout_stores_the_block_the_other_way_round_and_gathers_back():
    grid = ProcessGrid.build(GridShape(1, 1, 1, 1))
    full = torch.arange(12.0).view(3, 4)
    plain, transposed = Layout((3, 4), 0, 1, depth=True), Layout((3, 4), 0, 1, depth=True, transposed=True)
    assert torch.equal(shard(full, plain, grid), full.reshape(-1))
    assert torch.equal(shard(full, transposed, grid), full.t().reshape(-1))
    assert transposed.stored_block_shape(grid) == (4, 3) and transposed.block_shape(grid) == (3, 4)
    assert torch.equal(gather_block(shard(full, transposed, grid), transposed, grid), full)


def test_the_faster_layout_wins_only_beyond_the_margin():
    assert pick({OUT_IN: 1.0, IN_OUT: 0.9}) == IN_OUT
    assert pick({OUT_IN: 1.0, IN_OUT: 0.97}) == OUT_IN  # 3%: within the 5% margin, torch's layout stays
    assert pick({OUT_IN: 1.0, IN_OUT: 0.97}, margin=0.0) == IN_OUT
    assert pick({OUT_IN: 0.5, IN_OUT: 1.0}) == OUT_IN


class FakeTimer:
    """[in, out] is twice as fast for wide weights (out > in); records what it was asked to time."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, shape, tokens, dtype, device):
        self.calls.append((shape, tokens, dtype))
        return {OUT_IN: 2.0, IN_OUT: 1.0} if shape[0] > shape[1] else {OUT_IN: 1.0, IN_OUT: 1.0}


def test_choices_are_timed_once_and_then_read_from_the_cache_file(tmp_path):
    path = tmp_path / "cache" / "gemm_layouts.json"
    timer = FakeTimer()
    shapes = [(64, 16), (16, 16), (64, 16)]
    first = choose_layouts(shapes, 128, torch.float32, CPU, LayoutCache.load(path), timer=timer)
    assert {shape: choice.layout for shape, choice in first.items()} == {(64, 16): IN_OUT, (16, 16): OUT_IN}
    assert first[(64, 16)].speedup == 2.0 and not first[(64, 16)].cached
    assert len(timer.calls) == 2  # each distinct shape once
    assert path.is_file()

    again = choose_layouts(shapes, 128, torch.float32, CPU, LayoutCache.load(path), timer=timer)
    assert len(timer.calls) == 2 and all(choice.cached for choice in again.values())
    assert {shape: choice.layout for shape, choice in again.items()} == {(64, 16): IN_OUT, (16, 16): OUT_IN}

    # Another dtype or token count is another measurement; the earlier entries stay.
    choose_layouts([(64, 16)], 128, torch.bfloat16, CPU, LayoutCache.load(path), timer=timer)
    choose_layouts([(64, 16)], 256, torch.float32, CPU, LayoutCache.load(path), timer=timer)
    assert [call[1:] for call in timer.calls[2:]] == [(128, torch.bfloat16), (256, torch.float32)]
    assert len(json.loads(path.read_text())["entries"]) == 4


@pytest.mark.parametrize("content", ["{not json", '{"version": 99, "entries": {}}', "[1, 2]"])
def test_a_broken_cache_file_is_reported_timed_again_and_replaced(tmp_path, capsys, content):
    path = tmp_path / "gemm_layouts.json"
    path.write_text(content)
    timer = FakeTimer()
    choices = choose_layouts([(64, 16)], 8, torch.float32, CPU, LayoutCache.load(path), timer=timer)
    assert choices[(64, 16)].layout == IN_OUT and len(timer.calls) == 1
    warning = capsys.readouterr().err
    assert "GEMM layout cache" in warning and str(path) in warning and "timed again" in warning
    assert json.loads(path.read_text())["version"] == 1


def test_real_timings_are_positive_for_both_layouts():
    seconds = time_layouts((48, 32), 64, torch.float32, CPU, repeats=2)
    assert set(seconds) == set(GEMM_LAYOUTS) and all(0 < value < 1 for value in seconds.values())
