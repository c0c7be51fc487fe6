"""The sparse activations the trainers use, with the gradients each needs.

topk keeps each row's k largest pre-activations (ReLU'd); batch_topk keeps the k x rows largest of the
whole batch; jump_relu zeroes pre <= threshold, and `step` counts active latents for the L0 penalty,
both with a straight-through rectangle-kernel gradient for the threshold (bandwidth BANDWIDTH).
`decode` multiplies sparse activations by the decoder touching only the active latents' rows (forward
and backward), the same numbers as the dense product.
"""

from __future__ import annotations

import torch

BANDWIDTH = 0.001


def topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    acts = pre.relu()
    flat = acts.flatten()
    kept = flat.topk(min(k * pre.shape[0], flat.numel())).indices
    return torch.zeros_like(flat).scatter(0, kept, flat[kept]).view_as(acts)


def decode(acts: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """acts [b, w] @ W_dec [w, d] read from the non-zero entries only (an embedding bag over the active rows)."""
    rows, cols = acts.nonzero(as_tuple=True)
    offsets = torch.zeros(acts.shape[0], dtype=torch.long, device=acts.device)
    offsets[1:] = torch.bincount(rows, minlength=acts.shape[0]).cumsum(0)[:-1]
    return torch.nn.functional.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=acts[rows, cols])


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold):
        ctx.save_for_backward(pre, threshold)
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < BANDWIDTH / 2).to(grad.dtype)
        return grad * (pre > threshold), (-(threshold / BANDWIDTH) * near * grad).sum(0)


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold):
        ctx.save_for_backward(pre, threshold)
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < BANDWIDTH / 2).to(grad.dtype)
        return torch.zeros_like(pre), (-(1.0 / BANDWIDTH) * near * grad).sum(0)


def jump_relu(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return _JumpReLU.apply(pre, threshold)


def step(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return _Step.apply(pre, threshold)
