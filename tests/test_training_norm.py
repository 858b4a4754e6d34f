"""RMSNorm's hand-written training pass on CPU: gradients equal autograd through the textbook formula, a pre-norm
hands autocast its dtype with the fp32 norm rounded once, and norms whose output is the residual stream (a
sandwich block's post-norms, the final norm) keep fp32 under autocast."""

from __future__ import annotations

import torch

from tetra.model import ModelConfig, Transformer
from tetra.model.layers import RMSNorm


def _textbook(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight


def _norm(feeds_projection: bool) -> tuple[RMSNorm, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    norm = RMSNorm(24, 1e-5, feeds_projection).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(24, dtype=torch.float64, generator=generator) + 0.5)
    x = (3 * torch.randn(2, 5, 24, dtype=torch.float64, generator=generator)).requires_grad_()
    return norm, x


def test_gradients_equal_autograd_through_the_textbook_formula():
    norm, x = _norm(feeds_projection=True)
    assert torch.autograd.gradcheck(norm, (x,))
    norm(x).pow(2).sum().backward()
    x_reference, weight_reference = x.detach().clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    _textbook(x_reference, weight_reference).pow(2).sum().backward()
    assert torch.allclose(x.grad, x_reference.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(norm.weight.grad, weight_reference.grad, rtol=1e-10, atol=1e-12)


def test_a_pre_norm_hands_autocast_its_dtype_and_accurate_gradients():
    norm, x = _norm(feeds_projection=True)
    norm.float()
    x32 = x.detach().float().requires_grad_()
    expected = torch.nn.functional.rms_norm(x32.detach(), (24,), norm.weight.detach(), 1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x32)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected.bfloat16())
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).bfloat16()  # a bf16 output's
    (out * upstream).float().sum().backward()  # gradient arrives in bf16, as from the projection reading it
    assert x32.grad.dtype == torch.float32 and norm.weight.grad.dtype == torch.float32
    exact_x, exact_weight = x.detach().clone().requires_grad_(), norm.weight.detach().double().requires_grad_()
    (_textbook(exact_x, exact_weight) * upstream.double()).sum().backward()
    for mine, exact in ((x32.grad, exact_x.grad), (norm.weight.grad, exact_weight.grad)):
        assert (mine.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


def test_residual_stream_norms_keep_fp32_under_autocast():
    """A recurrent model's sandwich post-norms are its residual stream and carried state: in training under
    autocast they stay fp32, as in evaluation (only pre-norms, read by projections, return bf16)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, hidden_size=32, n_layers=4, n_heads=4, recurrent_prelude=1,
                                    recurrent_core=2, recurrent_coda=1, mean_recurrence=4, backprop_depth=2))
    model.init_weights(0.2)
    outputs = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, inputs, output: outputs.append(output.dtype))
    model.norm.register_forward_hook(lambda module, inputs, output: outputs.append(output.dtype))
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()(ids, recurrence=3).float().sum().backward()
    assert outputs and set(outputs) == {torch.float32}
