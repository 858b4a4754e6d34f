"""Optimizers whose state is shaped by the gradient's singular vectors: GaLore (Zhao et al. 2024) keeps Adam's
moments of each weight matrix in a rank-r projection of the gradient, so their memory falls from 2 m n to 2 r max(m,
n) + the projector; Conda keeps full-rank moments but takes the second moment in the rotated basis of the first
moment's singular vectors. Parameters that are not 2-D matrices (norms, biases, embeddings) get plain AdamW.

GaLore, for a gradient G [m, n] (projected on its shorter side; P refreshed from G's SVD every `update_interval`
steps, the moments kept across refreshes as the paper does):
    R = P^T G (m < n) or G P (m >= n);  m, v: Adam moments of R;  update = scale * (P N or N P^T), N = m_hat /
    (sqrt(v_hat) + eps)
Conda: m = Adam's first moment of G; U = singular vectors of m on its shorter side, refreshed every
`update_interval` steps; v = beta2 v + (1 - beta2) (U^T G)^2; update = U ((U^T m_hat) / (sqrt(v_hat) + eps)).

Both decay the weight (decoupled, AdamW-style) and keep every tensor in `state`, so a checkpoint resumes exactly.

A parameter group with "project": True holds the matrices that get this treatment (build_optimizer puts the
blocks' attention and MLP weights there, as GaLore does); every other group, and any tensor that is not 2-D, gets
plain AdamW.

On the 4D grid (grid given) each matrix is seen through its SplitMatrix: the projections and rotations are block
products summed over the group that splits the contracted side, the state is split like the weight (see each
class), and only a refresh sees the whole matrix (gathered on every rank of the replica for its SVD), so every rank
computes the one-process update of its own piece. state_layouts(parameter) tells a sharded checkpoint how to store
the state that is not shaped like the weight.

Entry points: GaLore(param_groups, ..., grid=None), Conda(param_groups, ..., grid=None).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

from tetra.parallel.batched_collectives import all_gather_each, all_reduce_each, reduce_scatter_each
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.layout import Layout
from tetra.parallel.split_matrix import SplitMatrix

# Whole blocks a step handles at once (fp32 bytes): Conda gathers the gradient and first-moment blocks of a bucket
# over depth and builds their rotated products, so its temporaries are a few times this.
BUCKET_BYTES = 64 << 20


def _adam(parameter: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """One AdamW step for a tensor without projection."""
    beta1, beta2 = group["betas"]
    if not state:
        state["step"] = 0
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(parameter), torch.zeros_like(parameter)
    state["step"] += 1
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = state["step"]
    denominator = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
    parameter.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1**step))


def _left_side(shape: tuple[int, int]) -> bool:
    """Project (or rotate) the rows when there are fewer of them than columns."""
    return shape[0] < shape[1]


class _Matrix(NamedTuple):
    """One projected matrix in a step: how it is split, the parameter, its fp32 gradient, its state, its group."""

    view: SplitMatrix
    parameter: torch.Tensor
    grad: torch.Tensor
    state: dict
    group: dict


class _SingularOptimizer(torch.optim.Optimizer):
    """What GaLore and Conda share: AdamW for unprojected tensors, decoupled weight decay, the refresh clock, and
    each matrix seen through its SplitMatrix (the whole matrix on one process; its block on the 4D grid)."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 update_interval: int, grid: ProcessGrid | None = None, **extra) -> None:
        if update_interval < 1:
            raise ValueError(f"update_interval must be at least 1 (got {update_interval})")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      update_interval=update_interval, **extra))
        self.grid = grid
        self._views: dict[torch.Tensor, SplitMatrix] = {}
        self._group_of: dict[int, dict] = {}  # parameter id -> its group, rebuilt when groups are added

    def _view(self, parameter: torch.Tensor) -> SplitMatrix:
        if parameter not in self._views:
            self._views[parameter] = SplitMatrix.of(parameter, self.grid)
        return self._views[parameter]

    def _is_matrix(self, parameter: torch.Tensor) -> bool:
        """2-D as a whole (a grid shard may be stored flat)."""
        layout = getattr(parameter, "tetra_layout", None) if self.grid is not None else None
        return len(layout.full_shape if layout is not None else parameter.shape) == 2

    def _projected(self, parameter: torch.Tensor) -> dict | None:
        """The parameter's group when it gets the matrix treatment, else None."""
        if len(self._group_of) != sum(len(group["params"]) for group in self.param_groups):
            self._group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        group = self._group_of.get(id(parameter))
        return group if group is not None and group.get("project") and self._is_matrix(parameter) else None

    def state_layouts(self, parameter: torch.Tensor) -> dict[str, Layout]:
        """Layouts (full shape and split) of the state tensors not shaped like the parameter: what a sharded
        checkpoint needs to write and reshard them."""
        group = self._projected(parameter)
        return {} if group is None else self._matrix_state_layouts(self._view(parameter), group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        matrices = []
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad = parameter.grad.float()
                if group["weight_decay"]:
                    parameter.mul_(1 - group["lr"] * group["weight_decay"])
                state = self.state[parameter]
                if "step" in state:  # a checkpoint hands it back as a tensor; the bias corrections want a number
                    state["step"] = int(state["step"])
                if group.get("project") and self._is_matrix(parameter):
                    matrices.append(_Matrix(self._view(parameter), parameter, grad, state, group))
                else:
                    _adam(parameter, grad, state, group)
        for bucket in self._buckets(matrices):  # on the grid, one collective per group for a bucket's pieces
            self._matrix_steps(bucket)
        return loss

    def _buckets(self, matrices: list[_Matrix]) -> list[list[_Matrix]]:
        """Consecutive matrices whose whole blocks add up to at most BUCKET_BYTES (at least one each): the
        temporaries a step gathers stay bounded, and every rank cuts the same buckets."""
        buckets: list[list[_Matrix]] = []
        total = BUCKET_BYTES
        for matrix in matrices:
            size = 4 * matrix.view.block_numel()
            if total + size > BUCKET_BYTES:
                buckets.append([])
                total = 0
            buckets[-1].append(matrix)
            total += size
        return buckets

    def _factors(self, wholes: list[torch.Tensor], factor: Callable[[int, torch.Tensor], torch.Tensor],
                 shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """factor(k, whole) for each matrix a refresh decomposes. On the grid, matrix k is decomposed by rank
        k % world and the results reach every rank in one all-reduce with zeros everywhere else (exact): the SVDs
        are spread over the ranks, and every rank holds the same vectors even where two ranks' solvers would
        differ."""
        if self.grid is None or not dist.is_initialized():
            return [factor(k, whole) for k, whole in enumerate(wholes)]
        world, rank = dist.get_world_size(), dist.get_rank()
        results = [factor(k, whole).contiguous() if k % world == rank else whole.new_zeros(shape)
                   for k, (whole, shape) in enumerate(zip(wholes, shapes, strict=True))]
        all_reduce_each(results, [dist.group.WORLD] * len(results))
        return results

    def _matrix_steps(self, matrices: list[_Matrix]) -> None:
        raise NotImplementedError

    def _matrix_state_layouts(self, view: SplitMatrix, group: dict) -> dict[str, Layout]:
        raise NotImplementedError


def _normalized(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, group: dict) -> torch.Tensor:
    """Adam's bias-corrected m_hat / (sqrt(v_hat) + eps)."""
    beta1, beta2 = group["betas"]
    return (exp_avg / (1 - beta1**step)) / ((exp_avg_sq / (1 - beta2**step)).sqrt() + group["eps"])


class GaLore(_SingularOptimizer):
    """Adam in a rank-`rank` projection of each matrix's gradient, refreshed every update_interval steps.

    On the grid: the projector's rows follow the split of the projected side, the moments (of P^T G: [r, n], or
    G P: [m, r]) are split like the other side and sharded over depth; the refresh's SVD takes the whole gradient.
    Each depth rank projects only its own values (the projection is linear), so a step sums small [r, n_j] results
    and gathers normalized moments: no whole block is communicated (each rank still multiplies one)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int = 128, update_interval: int = 200, scale: float = 0.25,
                 grid: ProcessGrid | None = None) -> None:
        if rank < 1:
            raise ValueError(f"GaLore's rank must be at least 1 (got {rank})")
        super().__init__(params, lr, betas, eps, weight_decay, update_interval, grid, rank=rank, scale=scale)

    def _matrix_state_layouts(self, view: SplitMatrix, group: dict) -> dict[str, Layout]:
        m, n = view.shape
        rank = min(group["rank"], m, n)
        side = _side(view)
        moments = view.state_layout((rank, n), {1: 1}, depth=True) if side == 0 else \
            view.state_layout((m, rank), {0: 0}, depth=True)
        return {"projector": view.state_layout((view.shape[side], rank), {0: side}, depth=False),
                "exp_avg": moments, "exp_avg_sq": moments}

    def _matrix_steps(self, matrices: list[_Matrix]) -> None:
        refreshed = [matrix for matrix in matrices if "projector" not in matrix.state
                     or matrix.state["step"] % matrix.group["update_interval"] == 0]
        ranks = [min(matrix.group["rank"], *matrix.view.shape) for matrix in refreshed]

        def top_vectors(k: int, whole: torch.Tensor) -> torch.Tensor:
            u, _, vh = torch.linalg.svd(whole, full_matrices=False)
            return u[:, :ranks[k]] if _left_side(whole.shape) else vh[:ranks[k]].T

        projectors = self._factors([matrix.view.full(matrix.grad) for matrix in refreshed], top_vectors,
                                   [(matrix.view.shape[_side(matrix.view)], rank)
                                    for matrix, rank in zip(refreshed, ranks, strict=True)])
        for (view, _, _, state, _), projector in zip(refreshed, projectors, strict=True):
            state["projector"] = view.chunk(projector, _side(view))
        products = []
        for view, _, grad, state, _ in matrices:
            block, projector = view.partial_block(grad), state["projector"]
            products.append(projector.T @ block if _left_side(view.shape) else block @ projector)
        all_reduce_each(products, [matrix.view.group(_side(matrix.view)) for matrix in matrices])
        all_reduce_each(products, [matrix.view.depth_group() for matrix in matrices])
        normalized = []
        for (view, _, _, state, group), reduced in zip(matrices, products, strict=True):
            piece = view.depth_piece(reduced)
            if "exp_avg" not in state:
                state["step"] = 0
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(piece), torch.zeros_like(piece)
            beta1, beta2 = group["betas"]
            state["step"] += 1
            state["exp_avg"].lerp_(piece, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(piece, piece, value=1 - beta2)
            normalized.append(_normalized(state["exp_avg"], state["exp_avg_sq"], state["step"], group))
        gathered = all_gather_each(normalized, [matrix.view.depth_group() for matrix in matrices])
        for (view, parameter, _, state, group), reduced, whole in zip(matrices, products, gathered, strict=True):
            moments = SplitMatrix.whole_from(whole, tuple(reduced.shape))
            projector = state["projector"]
            update = projector @ moments if _left_side(view.shape) else moments @ projector.T
            parameter.add_(view.local(update).to(parameter.dtype), alpha=-group["lr"] * group["scale"])


class Conda(_SingularOptimizer):
    """Adam with the second moment taken in the rotated basis of the first moment's singular vectors.

    On the grid: both moments are shaped and sharded like the weight (the rotated index split like the side it
    replaces); the basis keeps the rows of this rank's chunk of the rotated side; the refresh's SVD takes the whole
    first moment."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, update_interval: int = 200, grid: ProcessGrid | None = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, update_interval, grid)

    def _matrix_state_layouts(self, view: SplitMatrix, group: dict) -> dict[str, Layout]:
        side = _side(view)
        return {"basis": view.state_layout((view.shape[side],) * 2, {0: side}, depth=False)}

    def _matrix_steps(self, matrices: list[_Matrix]) -> None:
        for _, _, grad, state, group in matrices:
            if "exp_avg" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg"].lerp_(grad, 1 - group["betas"][0])
        refreshed = [matrix for matrix in matrices if matrix.state["step"] % matrix.group["update_interval"] == 0]

        def basis_of(_: int, whole: torch.Tensor) -> torch.Tensor:
            u, _, vh = torch.linalg.svd(whole, full_matrices=False)
            return u if _left_side(whole.shape) else vh.T

        bases = self._factors([matrix.view.full(matrix.state["exp_avg"]) for matrix in refreshed], basis_of,
                              [(matrix.view.shape[_side(matrix.view)],) * 2 for matrix in refreshed])
        for (view, _, _, state, _), basis in zip(refreshed, bases, strict=True):
            state["basis"] = view.chunk(basis, _side(view))
        views = [matrix.view for matrix in matrices]
        depth_groups = [view.depth_group() for view in views]
        side_groups = [view.group(_side(view)) for view in views]
        # U^T B (or B U) for the gradient and the first moment: blocks gathered over depth, products summed over the
        # side's group, this rank keeping its chunk of the rotated side (the weight's shape again).
        locals_ = [matrix.grad for matrix in matrices] + [matrix.state["exp_avg"] for matrix in matrices]
        blocks = [view.block_from(gathered) for view, gathered in
                  zip(views * 2, all_gather_each(locals_, depth_groups * 2), strict=True)]
        rotated = [_rotate(view, matrix.state["basis"], block) for view, matrix, block in
                   zip(views * 2, matrices * 2, blocks, strict=True)]
        chunks = reduce_scatter_each(rotated, side_groups * 2)
        rotated = [view.local(SplitMatrix.from_side_major(chunk, tuple(block.shape), _side(view))).contiguous()
                   for view, chunk, block in zip(views * 2, chunks, blocks, strict=True)]
        normalized = []
        for index, (_, _, _, state, group) in enumerate(matrices):
            rotated_grad, rotated_avg = rotated[index], rotated[len(matrices) + index]
            if "exp_avg_sq" not in state:
                state["exp_avg_sq"] = torch.zeros_like(rotated_grad)
            state["step"] += 1
            state["exp_avg_sq"].mul_(group["betas"][1]).addcmul_(rotated_grad, rotated_grad,
                                                                 value=1 - group["betas"][1])
            normalized.append(_normalized(rotated_avg, state["exp_avg_sq"], state["step"], group))
        # The update U N needs every chunk of N's rotated side: gathered over depth, then over the side's group.
        n_blocks = [view.block_from(gathered) for view, gathered in
                    zip(views, all_gather_each(normalized, depth_groups), strict=True)]
        wholes = all_gather_each([SplitMatrix.side_major(block, _side(view)) for view, block in
                                  zip(views, n_blocks, strict=True)], side_groups)
        for (view, parameter, _, state, group), block, whole in zip(matrices, n_blocks, wholes, strict=True):
            side, basis = _side(view), state["basis"]
            shape = tuple(view.shape[side] if dim == side else block.shape[dim] for dim in (0, 1))
            moments = SplitMatrix.from_side_major(whole, shape, side)
            update = basis @ moments if side == 0 else moments @ basis.T
            parameter.add_(view.local(update).to(parameter.dtype), alpha=-group["lr"])


def _side(view: SplitMatrix) -> int:
    """The side projected (GaLore) or rotated (Conda): 0, the rows, when there are fewer of them."""
    return 0 if _left_side(view.shape) else 1


def _rotate(view: SplitMatrix, basis: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """This rank's part of U^T B (or B U), flattened side-major for the reduce-scatter over the side's group."""
    side = _side(view)
    return SplitMatrix.side_major(basis.T @ block if side == 0 else block @ basis, side)
