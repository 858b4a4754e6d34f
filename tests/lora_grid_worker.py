"""Worker for the LoRA-on-the-grid equality tests: adapters split with their frozen base train like one process
(loss, adapter gradients, global norm, 5 AdamW steps), the base stays bit-identical, and NEFTune's noise on a
row x col grid equals one process's (gloo, CPU, fp32).

Entry point: check_lora_grids(rank, world, port, cases, out_path), started by torch.multiprocessing.spawn.
"""

from __future__ import annotations

import copy

import torch

from parallel_worker import GLOBAL_BATCH, MAX_NORM, MODELS, SEQ, STEPS, _max_error, run_cases
from tetra.adapters.lora import LoRAConfig, apply_lora
from tetra.model import ModelConfig, Transformer
from tetra.parallel.collectives import all_reduce
from tetra.parallel.grid import GridShape, ProcessGrid
from tetra.parallel.layout import unshard
from tetra.parallel.parallelize import (
    clip_global_grad_norm,
    full_state_dict,
    linear_block_shapes,
    parallel_next_token_loss,
    parallelize,
    sync_gradients,
)
from tetra.train.losses import next_token_loss
from tetra.train.neftune import attach_neftune


def _adapted(model_name: str) -> Transformer:
    """A model with adapters on every projection (and the head when untied), B drawn non-zero: with B = 0, A's
    gradient would be zero and the test would prove nothing about it."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**MODELS[model_name]))
    model.init_weights(std=0.2)
    targets = ["all-linear"] + ([] if model.config.tie_embeddings else ["head"])
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=targets), seed=0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def _trainable(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return {name: value for name, value in state.items() if name in names}


def _check(model_name: str, shape: GridShape, gemm_layout: str = "out_in", neftune: float = 0.0) -> dict:
    grid = ProcessGrid.build(shape)
    reference = _adapted(model_name)
    layouts = dict.fromkeys(linear_block_shapes(reference, grid), gemm_layout)
    parallel = parallelize(copy.deepcopy(reference), grid, gemm_layouts=layouts)
    base = {name: value.clone() for name, value in full_state_dict(parallel, grid).items()
            if "lora_" not in name}
    if neftune:
        attach_neftune(reference, neftune)
        attach_neftune(parallel, neftune, grid)
    vocab = MODELS[model_name]["vocab_size"]
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    local = tokens.chunk(grid.size("batch"))[grid.index("batch")]
    labels = tokens[:, 1:].numel()

    def adamw(parameters):
        return torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=1e-2, weight_decay=0.1, eps=1e-3)

    ref_optimizer, par_optimizer = adamw(reference.parameters()), adamw(parallel.parameters())
    result = {"model": model_name, "grid": shape.__dict__, "gemm_layout": gemm_layout, "neftune": neftune}
    for step in range(STEPS):
        torch.manual_seed(100 + step)  # the same noise stream on both sides
        ref_loss, _ = next_token_loss(reference, tokens)
        ref_loss.backward()
        torch.manual_seed(100 + step)
        loss, loss_sum = parallel_next_token_loss(parallel, local, grid, labels)
        loss.backward()
        sync_gradients(parallel, grid)
        global_loss = float(all_reduce(loss_sum.clone(), grid.groups["batch"])) / labels
        if step == 0:
            result["loss_error"] = abs(global_loss - ref_loss.item()) / ref_loss.item()
            ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
            par_grads = _full_grads(parallel, grid)
            result["grad_names_match"] = sorted(par_grads) == sorted(ref_grads) and len(ref_grads) > 0
            result["grad_error"] = _max_error(par_grads, ref_grads)
            result["frozen_grads"] = sum(p.grad is not None for p in parallel.parameters() if not p.requires_grad)
        ref_norm = float(torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad],
                                                        MAX_NORM))
        par_norm = clip_global_grad_norm(parallel, grid, MAX_NORM)
        result["norm_error"] = max(result.get("norm_error", 0.0), abs(par_norm - ref_norm) / ref_norm)
        for optimizer in (ref_optimizer, par_optimizer):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    after = full_state_dict(parallel, grid)
    ref_params = {n: p.detach() for n, p in reference.named_parameters()}
    result["param_error"] = _max_error(_trainable(after, reference), _trainable(ref_params, reference))
    result["base_unchanged"] = all(torch.equal(after[name], value) for name, value in base.items())
    return result


def _full_grads(model: torch.nn.Module, grid: ProcessGrid) -> dict[str, torch.Tensor]:
    """The whole gradient of every parameter that has one (a collective: every rank calls it in the same order)."""
    return {name: unshard(p.grad, p.tetra_layout, grid) if hasattr(p, "tetra_layout") else p.grad
            for name, p in model.named_parameters() if p.grad is not None}


def check_lora_grids(rank: int, world: int, port: int, cases: list, out_path: str) -> None:
    """Every (model, grid, layout, neftune) case against one process."""
    run_cases(lambda model_name, shape, *extra: _check(model_name, GridShape(**shape), *extra), rank, world, port,
              cases, out_path)
